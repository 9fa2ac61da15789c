"""MoE against independent references from `transformers` (fp64, copied weights).

DESIGN.md §3: router softmax(W_r h) over n experts, top-K, weights renormalised over the K, SwiGLU experts —
this is Mixtral's routing (Jamba's JambaTopKRouter leaves the K weights unnormalised, so it is not the reference).
Load-balancing loss: mixcon's f_i is the fraction of the M·K (token, expert) assignments (Σ f_i = 1, loss 1 for a
uniform router); transformers' `load_balancing_loss_func` uses the fraction of tokens (Σ f_i = K), so per layer
mixcon = transformers / K. Across layers mixcon takes the mean of per-layer losses, transformers pools counts and
probabilities over all layers before the product: pinned below so that a change of convention is deliberate.
"""

from __future__ import annotations

import pytest
import torch

from mixcon import MixConConfig
from mixcon.layers import moe as moe_module
from mixcon.layers.moe import MoE

pytest.importorskip("transformers")


def _mixtral():
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import (
            MixtralExperts,
            MixtralSparseMoeBlock,
            load_balancing_loss_func,
        )
    except ImportError as e:  # an older or newer transformers without these names
        pytest.skip(f"transformers lacks Mixtral's MoE classes: {e}")
    return MixtralConfig, MixtralExperts, MixtralSparseMoeBlock, load_balancing_loss_func


def _pair(d: int, hidden: int, n: int, k: int):
    """A mixcon MoE with O(1) router weights (so that routing matters) and the Mixtral block holding its weights.
    transformers' stacked experts have mixcon's layout: gate_up_proj (n, 2·hidden, d) with gate first, down_proj
    (n, d, hidden); the router is a bias-free (n, d) weight."""
    MixtralConfig, _, MixtralSparseMoeBlock, _ = _mixtral()
    torch.manual_seed(0)
    moe = MoE(d, hidden, n, k, init_std=0.5).double()
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 1.0)
    cfg = MixtralConfig(hidden_size=d, intermediate_size=hidden, num_local_experts=n, num_experts_per_tok=k,
                        hidden_act="silu", router_jitter_noise=0.0)
    ref = MixtralSparseMoeBlock(cfg).double().eval()
    with torch.no_grad():
        ref.gate.weight.copy_(moe.router.weight)
        ref.experts.gate_up_proj.copy_(moe.w_gate_up)
        ref.experts.down_proj.copy_(moe.w_down)
    return moe, ref, cfg


SHAPES = [(8, 12, 4, 2), (16, 8, 8, 3), (8, 6, 6, 1), (8, 6, 4, 4)]  # d, hidden, n, K


@pytest.mark.parametrize("d,hidden,n,k", SHAPES)
def test_output_and_router_logits_equal_mixtral_sparse_moe_block(d, hidden, n, k):
    """Catches: dropping the renormalisation over the K (or renormalising Jamba-style never), gate/up swapped in
    w_gate_up, w_down or w_gate_up read transposed, another activation than SiLU, a weight applied to the wrong
    (token, expert) pair. Tolerance 1e-6: Mixtral's router takes its softmax in fp32 (a mutation moves the output by
    O(0.1))."""
    moe, ref, _ = _pair(d, hidden, n, k)
    x = torch.randn(2, 5, d, dtype=torch.float64)
    with torch.no_grad():
        out, stats = moe(x)
        want = ref(x.clone())
        logits, _, _ = ref.gate(x.reshape(-1, d))
    torch.testing.assert_close(stats.logits, logits, rtol=0, atol=1e-13)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["grouped", "gathered", "dense", "masked"])
@pytest.mark.parametrize("d,hidden,n,k", SHAPES[:2])
def test_every_combine_path_equals_mixtral_experts_in_fp64(monkeypatch, path, d, hidden, n, k):
    """Mixtral's experts given mixcon's routing (fp64 end to end): the grouped path (forward with statistics), the
    gathered one (a few tokens), the dense one (stats=False where `static_shapes`, i.e. compiled or on a GPU: forced
    here) and a token mask (pads skip the experts, output 0). Catches a wrong token/expert pairing or weight in any
    one path (e.g. a `repeat` for `repeat_interleave` in combine_gathered, a transposed routing matrix in
    combine_dense)."""
    _, MixtralExperts, _, _ = _mixtral()
    moe, _, cfg = _pair(d, hidden, n, k)
    experts = MixtralExperts(cfg).double()
    with torch.no_grad():
        experts.gate_up_proj.copy_(moe.w_gate_up)
        experts.down_proj.copy_(moe.w_down)
    M = 1 if path == "gathered" else 10
    h = torch.randn(M, d, dtype=torch.float64)
    with torch.no_grad():
        _, _, weights, idx = moe.route(h)
        want = experts(h, idx, weights)
        if path == "dense":
            monkeypatch.setattr(moe_module, "static_shapes", lambda h: True)
            out, _ = moe(h, stats=False)
        elif path == "masked":
            mask = torch.ones(M, dtype=torch.bool)
            mask[[0, 3, 4]] = False
            out, _ = moe(h, token_mask=mask)
            want = torch.where(mask[:, None], want, 0.0)
        else:
            out, _ = moe(h)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["grouped", "gathered", "gathered-static"])
@pytest.mark.parametrize("d,hidden,n,k", SHAPES)
def test_gradients_equal_mixtral_sparse_moe_block(monkeypatch, path, d, hidden, n, k):
    """Gradients of the input, the router and both stacked expert weights against Mixtral's block, through the
    paths a forward with statistics (training) takes: grouped by expert, or for one token each pair's expert read
    in place or gathered (`static_shapes`: compiled or on a GPU; forced here). Catches routing weights detached
    from the router, a gradient lost in the gather/scatter of tokens, a backward that reads another expert.
    Tolerance: Mixtral's router softmax is fp32."""
    moe, ref, _ = _pair(d, hidden, n, k)
    monkeypatch.setattr(moe_module, "static_shapes", lambda h: path == "gathered-static")
    shape = (2, 9, d) if path == "grouped" else (1, 1, d)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape, dtype=torch.float64)
    grads = []
    for block, weights in ((moe, (moe.router.weight, moe.w_gate_up, moe.w_down)),
                           (ref, (ref.gate.weight, ref.experts.gate_up_proj, ref.experts.down_proj))):
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        grads.append(torch.autograd.grad((out * g).sum(), [x, *weights]))
    for name, ours, theirs in zip(["input", "router", "w_gate_up", "w_down"], *grads, strict=True):
        assert float(theirs.norm()) > 0 or (name == "router" and k == 1), name  # K = 1: its weight is 1
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("d,hidden,n,k", SHAPES)
def test_load_balancing_loss_is_transformers_divided_by_k(masked, d, hidden, n, k):
    """mixcon's aux (n · Σ f_i P_i, f over the M·K assignments) = transformers' load_balancing_loss_func / K, with
    and without an attention mask (pads count in no statistic; transformers gets a pad's logits as 0, as mixcon's
    model returns them). Catches: pads counted, f over M instead of M·K (a factor K), P_i taken over the top-K
    weights instead of the full softmax, a mean over the wrong axis. Tolerance: transformers accumulates in fp32."""
    *_, load_balancing_loss_func = _mixtral()
    moe, _, _ = _pair(d, hidden, n, k)
    B, T = 3, 7
    x = torch.randn(B, T, d, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    if masked:
        mask[0, :4] = False
        mask[2, :1] = False
    with torch.no_grad():
        _, stats = moe(x, token_mask=mask if masked else None)
    logits = torch.zeros(B * T, n, dtype=torch.float64).index_copy(0, mask.flatten().nonzero()[:, 0], stats.logits)
    want = load_balancing_loss_func((logits,), n, k, attention_mask=mask.long() if masked else None)
    torch.testing.assert_close(stats.aux_loss * k, want.to(torch.float64), rtol=1e-6, atol=1e-6)


def test_z_loss_equals_switch_transformers_router_z_loss():
    """z = mean over real tokens of logsumexp(logits)² (ST-MoE). Catches a sum for the mean, a missing square,
    logsumexp of the probabilities instead of the logits."""
    try:
        from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func
    except ImportError as e:
        pytest.skip(f"transformers lacks router_z_loss_func: {e}")
    moe, _, _ = _pair(8, 6, 4, 2)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        _, stats = moe(x)
    torch.testing.assert_close(stats.z_loss, router_z_loss_func(stats.logits.view(2, 5, 4)), rtol=1e-12, atol=1e-12)


def test_model_aux_loss_is_the_mean_of_per_layer_losses_not_transformers_pooled():
    """Pins the cross-layer convention: MixConOutput.aux_loss = mean over MoE layers of (per-layer transformers
    loss / K); transformers' pooled loss over all layers' router logits differs (it is computed for reference and
    must not coincide, or this test no longer says which convention holds). Catches a switch to pooling, or a sum
    over layers for the mean."""
    *_, load_balancing_loss_func = _mixtral()
    from mixcon.models.mixcon import MixConForCausalLM

    torch.manual_seed(0)
    cfg = MixConConfig.preset("tiny")
    model = MixConForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoE):
                module.router.weight.normal_(0.0, 2.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_logits=True)
    logits = tuple(x.reshape(-1, cfg.n_experts) for x in out.router_logits)
    assert len(logits) == sum(f == "moe" for _, f in cfg.layout())
    per_layer = torch.stack([load_balancing_loss_func((x,), cfg.n_experts, cfg.top_k, attention_mask=mask)
                             for x in logits]).to(torch.float64) / cfg.top_k
    torch.testing.assert_close(out.aux_loss, per_layer.mean(), rtol=1e-6, atol=1e-6)
    pooled = float(load_balancing_loss_func(logits, cfg.n_experts, cfg.top_k, attention_mask=mask)) / cfg.top_k
    assert abs(pooled - float(out.aux_loss)) > 1e-3
