"""MoE: exactly K experts per token, weights sum to 1, grouped compute equals a per-token loop,
load-balancing loss ≈ 1 for a uniform router and larger for a collapsed one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixcon.layers.moe import MoE


def make_moe(n=8, k=2, d=16, hidden=24) -> MoE:
    torch.manual_seed(0)
    moe = MoE(d, hidden, n, k).double()
    with torch.no_grad():
        moe.w_gate_up.normal_(0, 0.3)
        moe.w_down.normal_(0, 0.3)
    return moe


def test_routing_picks_k_distinct_experts_with_weights_summing_to_one():
    moe = make_moe()
    h = torch.randn(50, 16, dtype=torch.float64)
    _, probs, weights, experts = moe.route(h)
    assert experts.shape == (50, 2)
    assert bool((experts[:, 0] != experts[:, 1]).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(probs.gather(1, experts).argmax(-1), torch.zeros(50, dtype=torch.long))


def test_grouped_compute_equals_a_per_token_loop():
    moe = make_moe()
    h = torch.randn(3, 7, 16, dtype=torch.float64)
    out, stats = moe(h)
    _, _, weights, experts = moe.route(h.reshape(-1, 16))
    expected = torch.zeros(21, 16, dtype=torch.float64)
    for t, x in enumerate(h.reshape(-1, 16)):
        for w, e in zip(weights[t], experts[t], strict=True):
            gate, up = (moe.w_gate_up[e] @ x).chunk(2)  # (out, in) weights
            expected[t] += w * (moe.w_down[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(out.reshape(-1, 16), expected)
    assert int(stats.counts.sum()) == 21 * 2
    torch.testing.assert_close(stats.counts, torch.bincount(experts.reshape(-1), minlength=8))


def test_the_grouped_path_compiles_with_the_eager_gradients():
    """torch.compile (dynamo and autograd's graphs; the routing counts break the graph) gives the eager outputs and
    gradients of the experts, the router and the input, unused experts included (zero)."""
    moe = make_moe(n=8, k=2)
    h = torch.randn(5, 16, dtype=torch.float64)
    grads = []
    for fn in (moe, torch.compile(moe, backend="aot_eager", fullgraph=False)):
        x = h.clone().requires_grad_(True)
        out, stats = fn(x)
        (out.square().sum() + stats.aux_loss).backward()
        grads.append([out.detach(), x.grad] + [p.grad.clone() for p in moe.parameters()])
        moe.zero_grad()
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_one_token_path_equals_the_grouped_path():
    """Decoding (one token per call) takes its own path; it gives each token what the batch gave it."""
    moe = make_moe()
    h = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    out, stats = moe(h)
    singles = [moe(x[None]) for x in h]
    torch.testing.assert_close(torch.cat([o for o, _ in singles]), out)
    torch.testing.assert_close(sum(s.counts for _, s in singles), stats.counts)
    torch.testing.assert_close(singles[0][1].z_loss, torch.logsumexp(moe.router(h[:1]), -1).square().mean())
    torch.autograd.grad(singles[0][0].sum(), moe.w_gate_up)  # differentiable too


@pytest.mark.parametrize("M", [1, 3, 4, 9])
def test_grouped_gathered_and_dense_combine_agree(M, monkeypatch):
    """The three ways to apply the routed experts give the same output (forward without statistics: the test
    below); the gathered one both ways: each pair's expert read in place (eager on a CPU) and the batched products
    of gathered weights (where `static_shapes`: compiled, accelerators), which pair the M·K rows token-major."""
    import mixcon.layers.moe as moe_module

    moe = make_moe()
    h = torch.randn(M, 16, dtype=torch.float64)
    _, _, weights, experts = moe.route(h)
    grouped = moe.combine(h, weights, experts)
    torch.testing.assert_close(moe.combine_gathered(h, weights, experts), grouped)
    torch.testing.assert_close(moe.combine_dense(h, weights, experts), grouped)
    monkeypatch.setattr(moe_module, "static_shapes", lambda h: True)
    torch.testing.assert_close(moe.combine_gathered(h, weights, experts), grouped)


def test_load_balancing_loss_uniform_vs_collapsed():
    moe = make_moe(n=4, k=1, d=4)
    # A near-zero router: probabilities ≈ uniform, and one-hot inputs send 25 tokens to each expert.
    h = torch.eye(4, dtype=torch.float64).repeat(25, 1)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4) * 1e-6)
        _, stats = moe(h)
    assert abs(float(stats.aux_loss) - 1.0) < 1e-4
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0].fill_(20.0)  # every token to expert 0 with p ≈ 1
        _, collapsed = moe(h + 1)
    assert float(collapsed.aux_loss) > 3.9  # → n = 4
    assert float(collapsed.z_loss) > float(stats.z_loss)



def test_pads_skip_the_experts_and_count_in_no_statistic():
    """With a token mask, the real tokens' outputs and the statistics are those of the real tokens alone
    (as transformers' load-balancing loss takes the attention mask); pads get 0."""
    moe = make_moe()
    h = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :5] = False
    mask[1, 7:] = False
    out, stats = moe(h, token_mask=mask)
    alone, expected = moe(h[mask])
    torch.testing.assert_close(out[mask], alone)
    assert not out[~mask].any()
    assert torch.equal(stats.counts, expected.counts) and int(stats.counts.sum()) == 2 * int(mask.sum())
    torch.testing.assert_close(stats.logits, expected.logits)  # the real tokens' logits, in order
    torch.testing.assert_close(stats.aux_loss, expected.aux_loss)
    torch.testing.assert_close(stats.z_loss, expected.z_loss)
    with torch.no_grad():
        _, empty = moe(h, token_mask=torch.zeros(2, 9, dtype=torch.bool))
    assert not empty.counts.any() and float(empty.aux_loss) == 0 and float(empty.z_loss) == 0

def test_gradients_reach_router_and_experts():
    moe = make_moe()
    out, stats = moe(torch.randn(20, 16, dtype=torch.float64))
    (out.sum() + stats.aux_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.w_gate_up.grad.abs().sum() > 0 and moe.w_down.grad.abs().sum() > 0


def test_a_bf16_layer_routes_with_an_fp32_softmax():
    """bf16 weights and input: the router's product in bf16, its logits taken to fp32 before the softmax (as
    Mixtral's router, whose softmax is in fp32), so the routing weights and statistics are fp32 too."""
    moe = make_moe().bfloat16()
    h = torch.randn(6, 16, dtype=torch.bfloat16)
    logits, probs, weights, _ = moe.route(h)
    assert logits.dtype == probs.dtype == weights.dtype == torch.float32
    torch.testing.assert_close(probs, moe.router(h).float().softmax(-1), rtol=0, atol=0)
    out, stats = moe(h)
    assert out.dtype == torch.bfloat16
    assert stats.logits.dtype == stats.aux_loss.dtype == stats.z_loss.dtype == torch.float32


def test_bf16_autocast_keeps_the_residual_dtype():
    """Under autocast the experts' matmuls run in bf16; the combined output keeps the input's dtype."""
    moe = make_moe().float()
    h = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = moe(h)
    assert out.dtype == torch.float32
    ref, _ = moe(h)
    assert float((out - ref).detach().norm() / ref.detach().norm()) < 3e-2


def test_a_decoding_step_on_many_tokens_runs_only_the_chosen_experts_on_a_cpu(monkeypatch):
    """Eager on a CPU, a decoding step's MoE (stats=False) on M·K > n pairs groups tokens by expert; every
    expert on every token (n/K times the products) only where shapes must stay static (compiled, accelerators)."""
    import mixcon.layers.moe as moe_module

    moe = make_moe()
    h = torch.randn(1, 12, 16, dtype=torch.float64)
    expected = moe(h)[0]
    dense = moe.combine_dense
    monkeypatch.setattr(moe, "combine_dense", lambda *a: pytest.fail("all experts on every token"))
    out, stats = moe(h, stats=False)
    torch.testing.assert_close(out, expected)
    assert stats is None  # the output alone
    monkeypatch.setattr(moe_module, "static_shapes", lambda h: True)
    monkeypatch.setattr(moe, "combine_dense", dense)
    monkeypatch.setattr(moe, "combine", lambda *a: pytest.fail("grouped by expert: a host sync"))
    torch.testing.assert_close(moe(h, stats=False)[0], expected)


def test_a_compiled_decoding_step_on_a_cpu_runs_in_one_graph():
    """Compiled, shapes stay static on a CPU too: a decoding step's MoE on M·K > n pairs is one graph (grouping by
    expert would read the counts on the host and break it), with the eager output."""
    moe = make_moe()
    h = torch.randn(12, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = moe(h)[0]
        compiled = torch.compile(lambda x: moe(x, stats=False)[0], backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(h), expected)


def test_a_moe_layer_alone_starts_from_seeded_finite_weights():
    """Used alone (not in a model, whose reset_parameters draws them), the experts are Normal(0, init_std),
    the same for the same seed (they were uninitialised memory)."""
    torch.manual_seed(0)
    a = MoE(32, 64, 4, 2)
    torch.manual_seed(0)
    b = MoE(32, 64, 4, 2)
    for name, param in a.named_parameters():
        assert torch.isfinite(param).all() and torch.equal(param, b.get_parameter(name)), name
    for w in (a.w_gate_up, a.w_down):
        assert abs(w.std().item() - 0.02) < 0.002
    assert torch.isfinite(a(torch.randn(2, 5, 32))[0]).all()


def test_bad_arguments_are_refused_by_name():
    for top_k in (0, 9):
        with pytest.raises(ValueError, match=rf"MoE: top_k={top_k} must be in \[1, n_experts=8\]"):
            MoE(16, 24, 8, top_k)
    moe = make_moe()
    h = torch.randn(2, 5, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"MoE: input must be \(\.\.\., d_model=16\), got shape \(2, 5, 17\)"):
        moe(torch.randn(2, 5, 17, dtype=torch.float64))
    for mask in (torch.ones(2, 4, dtype=torch.bool), torch.ones(5, 2, dtype=torch.bool)):  # pads or misrouted
        with pytest.raises(ValueError, match=rf"token_mask must have the input's shape but its last dimension, "
                                             rf"\(2, 5\), got \({mask.shape[0]}, {mask.shape[1]}\)"):
            moe(h, token_mask=mask)
    assert "d_model=16, hidden=24, n_experts=8, top_k=2" in repr(moe)
    with pytest.raises(TypeError, match=r"MoE: input is torch.float32, the weights torch.float64"):  # (torch's
        moe(h.float())  # own error named neither)
