"""Conba layer: equals transformers' Mamba2 mixer with every extra off; switches do what they say."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
import torch.nn.functional as F

from mixcon import MixConConfig
from mixcon.benchmarks.speed import mamba2_mixer
from mixcon.layers.conba import Conba

SSD = dict(conba_selective="linear", conba_state_scaling=False, conba_control=False, conba_delay=0)


def conba_config(**overrides) -> MixConConfig:
    base = dict(d_model=32, conba_expand=2, conba_head_dim=8, conba_state=16, conba_groups=2, conba_chunk=16,
                n_heads=4, n_kv_heads=2)
    return MixConConfig.preset("tiny", **{**base, **overrides})


@pytest.fixture
def mamba2():
    """transformers' Mamba2 module, where it has the grouped gated RMSNorm (only this test needs transformers)."""
    module = pytest.importorskip("transformers.models.mamba2.modeling_mamba2", reason="transformers not installed")
    if "group_size" not in inspect.signature(module.MambaRMSNormGated).parameters:
        pytest.skip("this transformers' Mamba2 normalises the gated RMSNorm over all groups at once (mamba_ssm and "
                    "this layer: per key group); 5.23 has the grouped norm")
    return module


# The weights a Conba layer in SSD mode and transformers' Mamba2Mixer both have, under the same names.
SHARED_WEIGHTS = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                  "out_proj.weight"]


def mamba2_twin(cfg: MixConConfig, conba: Conba) -> torch.nn.Module:
    """transformers' Mamba2Mixer (torch path) at `cfg`'s shapes, as `mixcon bench speed` builds it, holding the same
    weights as `conba` (the tests that call it ask for the `mamba2` fixture, which skips them without it)."""
    mixer = mamba2_mixer(cfg)
    with torch.no_grad():
        for name in SHARED_WEIGHTS:
            mixer.get_parameter(name).copy_(conba.get_parameter(name))
    return mixer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("T", [1, 37, 64])
def test_ssd_mode_equals_transformers_mamba2(T, mamba2):
    """transformers' torch path computes the scan in fp32 whatever the input dtype (it calls .float()),
    so the comparison is at fp32 precision: relative error <= 1e-5 against our fp64 and fp32 runs."""
    torch.manual_seed(0)
    cfg = conba_config(**SSD)
    conba = Conba(cfg, 0).eval()
    with torch.no_grad():  # non-trivial values everywhere
        conba.norm.weight.uniform_(0.5, 1.5)
        conba.D.uniform_(-1, 1)
    mixer = mamba2_twin(cfg, conba).eval()
    u = torch.randn(2, T, cfg.d_model)
    with torch.no_grad():
        theirs = mixer(u)
        ours32 = conba(u)
        ours64 = conba.double()(u.double())
    assert rel_err(ours32, theirs) < 1e-5
    assert rel_err(ours64, theirs) < 1e-5
    assert rel_err(ours64, theirs) > 0  # a real comparison of two computations


SHAPES = [  # d_model, expand, head_dim, state, groups, chunk, conv, B, T
    (16, 2, 8, 16, 2, 16, 4, 2, 37),  # groups > 1, T not a multiple of the chunk
    (24, 2, 48, 5, 1, 8, 5, 3, 69),  # one head, wider than the chunk
    (12, 3, 4, 1, 9, 3, 2, 1, 20),  # state 1, one head per group, chunk 3
    (8, 1, 2, 13, 1, 1, 6, 2, 11),  # chunk 1 (every step its own chunk), a conv of 6 taps
    (32, 1, 16, 24, 2, 64, 3, 1, 5),  # T shorter than one chunk
]


@pytest.mark.parametrize("d,expand,P,N,G,chunk,conv,B,T", SHAPES)
def test_gradients_equal_transformers_mamba2(d, expand, P, N, G, chunk, conv, B, T, mamba2):
    """Forward, input gradient and the gradient of every weight the two layers share, against transformers'
    Mamba2Mixer (torch path) in training mode, at shapes where heads, groups, chunks and conv taps line up in
    different ways. Ours in fp64; theirs takes the scan in fp32 (`.float()`), hence rel 1e-5 / 1e-4: a wrong
    term moves these by O(1)."""
    torch.manual_seed(0)
    cfg = conba_config(d_model=d, conba_expand=expand, conba_head_dim=P, conba_state=N, conba_groups=G,
                       conba_chunk=chunk, conba_conv=conv, **SSD)
    conba = Conba(cfg, 0)
    with torch.no_grad():  # away from the initial values that hide terms (D = 1, norm weight 1)
        conba.norm.weight.uniform_(0.5, 1.5)
        conba.D.uniform_(-1, 1)
        conba.dt_bias.add_(torch.randn_like(conba.dt_bias))
        conba.A_log.add_(0.5 * torch.randn_like(conba.A_log))
        conba.conv1d.bias.uniform_(-0.5, 0.5)
    mixer = mamba2_twin(cfg, conba).double().train()
    conba.double().train()
    u = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, T, d, dtype=torch.float64)
    results = []
    for layer in (conba, mixer):
        out = layer(u)
        results.append((out, torch.autograd.grad((out * g).sum(),
                                                 [u, *(layer.get_parameter(n) for n in SHARED_WEIGHTS)])))
    (ours, our_grads), (theirs, their_grads) = results
    assert rel_err(ours.detach(), theirs.detach()) < 1e-5
    assert rel_err(our_grads[0], their_grads[0]) < 1e-5
    for name, a, b in zip(SHARED_WEIGHTS, our_grads[1:], their_grads[1:], strict=True):
        assert rel_err(a, b) < 1e-4, name
        assert float(b.norm()) > 0, name  # the weight reaches the output


def conba_by_the_equations(layer: Conba, cfg: MixConConfig, u: torch.Tensor) -> torch.Tensor:
    """DESIGN.md §2 steps 1-7 token by token, every switch on (SwiGLU Sel, state scaling, control, delay):
    an independent reference for the layer (the output RMSNorm per key group, as Mamba-2's)."""
    H, P, N, G = layer.H, layer.P, layer.N, layer.G
    B, T, _ = u.shape
    z, xkq, beta_logit, rho_logit = (u @ layer.in_proj.weight.T).split([H * P, H * P + 2 * G * N, H, H], -1)
    w, K = layer.conv1d.weight[:, 0], layer.conv1d.kernel_size[0]  # (channels, K): tap j reads step t - K + 1 + j
    padded = F.pad(xkq, (0, 0, K - 1, 0))
    conv = F.silu(sum(w[:, j] * padded[:, j:j + T] for j in range(K)) + layer.conv1d.bias)
    x = conv[..., :H * P].unflatten(-1, (H, P))
    k, q = (F.normalize(t.unflatten(-1, (G, N)), dim=-1) for t in conv[..., H * P:].chunk(2, -1))
    W1, W2 = layer.sel.gate_up.weight.chunk(2)
    sel = (F.silu(u @ W1.T) * (u @ W2.T)) @ layer.sel.down.weight.T  # W3 (swish(W1 u) ⊙ W2 u)
    delta = F.softplus(sel + layer.dt_bias)  # (B, T, H)
    gamma = torch.exp(-delta * layer.A_log.exp()) * torch.sigmoid(rho_logit + layer.rho_bias)  # α_t s_t
    beta = cfg.conba_beta_max * torch.sigmoid(beta_logit)
    group = [h * G // H for h in range(H)]
    states = [torch.zeros(B, H, P, N, dtype=u.dtype)]  # S_0
    outputs = []  # o_t (B, H, P); nothing written in place, so autograd differentiates the equations too
    for t in range(T):
        S = []
        for h, g in enumerate(group):
            decayed = gamma[:, t, h, None, None] * states[-1][:, h]
            error = x[:, t, h] - torch.einsum("bpn,bn->bp", decayed, k[:, t, g])
            S.append(decayed + beta[:, t, h, None, None] * torch.einsum("bp,bn->bpn", error, k[:, t, g]))
        states.append(torch.stack(S, 1))
        delayed = states[max(t + 1 - cfg.conba_delay, 0)]  # S_{t-τ}, S_0 before the start
        outputs.append(torch.stack([torch.einsum("bpn,bn->bp", S[h] + layer.delay_gain[h] * delayed[:, h], q[:, t, g])
                                    + layer.D[h] * x[:, t, h] for h, g in enumerate(group)], 1))
    o = torch.stack(outputs, 1)  # (B, T, H, P)
    y = (o.flatten(2) * F.silu(z)).unflatten(-1, (G, H * P // G))
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    return (y.flatten(2) * layer.norm.weight) @ layer.out_proj.weight.T


def full_layer(beta_max: float) -> tuple[Conba, MixConConfig]:
    """An fp64 layer with every switch on, its weights away from the initial values that hide terms (g = 0,
    s ≈ 1, D = 1)."""
    torch.manual_seed(0)
    cfg = conba_config(conba_delay=2, conba_beta_max=beta_max, conba_chunk=4, conba_sel_hidden=6)
    layer = Conba(cfg, 0).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
        layer.delay_gain.normal_()
        layer.rho_bias.fill_(0.5)
    return layer, cfg


@pytest.mark.parametrize("beta_max", [1.0, 2.0])
def test_full_layer_equals_the_design_equations(beta_max):
    layer, cfg = full_layer(beta_max)
    u = torch.randn(2, 11, cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(u), conba_by_the_equations(layer, cfg, u), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta_max", [1.0, 2.0])
def test_full_layer_gradients_equal_the_design_equations(beta_max):
    """The gradients of the input and of every weight, every switch on, against autograd through the token-by-token
    equations: the chunked scan's and the conv's own backward passes included."""
    layer, cfg = full_layer(beta_max)
    u = torch.randn(2, 11, cfg.d_model, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 11, cfg.d_model, dtype=torch.float64)
    names, weights = zip(*layer.named_parameters(), strict=True)
    ours = torch.autograd.grad((layer(u) * g).sum(), [u, *weights])
    want = torch.autograd.grad((conba_by_the_equations(layer, cfg, u) * g).sum(), [u, *weights])
    for name, a, b in zip(["input", *names], ours, want, strict=True):
        assert float(b.norm()) > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_every_switch_changes_the_layer():
    """Turning any one mechanism on makes the output differ from the SSD baseline."""
    torch.manual_seed(0)
    u = torch.randn(1, 20, 32, dtype=torch.float64)
    base_cfg = conba_config(**SSD)
    torch.manual_seed(1)
    base = Conba(base_cfg, 0).double().eval()
    y0 = base(u)
    for override in (dict(conba_selective="swiglu"), dict(conba_state_scaling=True), dict(conba_control=True),
                     dict(conba_delay=2)):
        torch.manual_seed(1)
        layer = Conba(conba_config(**{**SSD, **override}), 0).double().eval()
        if layer.delay_gain is not None:
            with torch.no_grad():
                layer.delay_gain.fill_(0.5)  # initialised to 0: the delay starts switched off
        with torch.no_grad():
            y = layer(u)
        assert not torch.allclose(y, y0, atol=1e-6), override


def test_noise_only_in_training_and_seeded():
    cfg = conba_config(conba_process_noise=0.1, conba_observation_noise=0.1)
    layer = Conba(cfg, 0)
    u = torch.randn(2, 10, 32)
    layer.eval()
    torch.testing.assert_close(layer(u), layer(u), rtol=0, atol=0)
    layer.train()
    torch.manual_seed(3)
    a = layer(u)
    torch.manual_seed(3)
    b = layer(u)
    c = layer(u)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    quiet = Conba(cfg.replace(conba_process_noise=0.0, conba_observation_noise=0.0), 0)
    quiet.load_state_dict(layer.state_dict())
    quiet.eval()
    layer.eval()
    torch.testing.assert_close(layer(u), quiet(u))


def test_process_noise_enters_only_what_is_written():
    """DESIGN.md §2: process noise perturbs the state's writes alone; the D skip reads the clean x (with the scan
    returning zeros, the training output does not depend on the seed), and alone it still changes the output."""
    layer = Conba(conba_config(conba_process_noise=0.5, conba_observation_noise=0.0), 0).double().train()
    u = torch.randn(2, 10, 32, dtype=torch.float64)
    outputs = []
    for scan in (layer.scan_fn, lambda x, k, q, ld, beta, **kw: (torch.zeros_like(x), None)):
        layer.scan_fn = scan
        for seed in (1, 2):
            torch.manual_seed(seed)
            outputs.append(layer(u))
    assert not torch.allclose(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[2], outputs[3], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["process", "observation"])
def test_noise_has_the_configured_scale(kind):
    """DESIGN.md §2 step 8: x_t += σ_w ε (what the scan writes), o_t += σ_v ε (what the gated norm reads): in
    training they differ from eval by noise of standard deviation σ (1280 draws: within 10%)."""
    torch.manual_seed(0)
    sigma = 0.3
    layer = Conba(conba_config(**{f"conba_{kind}_noise": sigma}), 0).double()
    seen = []
    if kind == "process":
        scan = layer.scan_fn
        layer.scan_fn = lambda x, *args, **kw: seen.append(x) or scan(x, *args, **kw)
    else:
        layer.norm.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    u = torch.randn(2, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        layer.eval()(u)
        layer.train()(u)
    noise = seen[1] - seen[0]
    assert noise.numel() == 1280 and abs(float(noise.std()) - sigma) < 0.1 * sigma


def test_mamba2_initialisation_ranges():
    layer = Conba(conba_config(), 0)
    A = layer.A_log.exp()
    assert bool(((A >= 1) & (A <= 16)).all())
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert bool(((dt >= 1e-3 * 0.99) & (dt <= 0.1 * 1.01)).all())
    assert bool((layer.D == 1).all()) and bool((layer.delay_gain == 0).all())
    assert bool((torch.sigmoid(layer.rho_bias) > 0.99).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_pads_non_finite_input_reaches_no_real_position(poisoned_pads, bad):
    """Pads enter the conv as zeros and leave the state as it is, even non-finite ones (a product by the mask
    would carry nan · 0 = nan into the conv window and the state)."""
    cfg = conba_config()
    want, got = poisoned_pads(Conba(cfg, 0), cfg.d_model, bad)
    torch.testing.assert_close(got, want)


def test_torch_compile_matches_eager():
    """The layer compiles (no graph break breaks it) and gives the eager result, every mechanism on."""
    torch.manual_seed(0)
    conba = Conba(conba_config(), 0).eval()
    u = torch.randn(2, 37, 32)
    with torch.no_grad():
        eager = conba(u)
        compiled = torch.compile(conba, fullgraph=True)(u)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_triton_kernel_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that the layer takes the kernel on a CPU
    monkeypatch.setitem(sys.modules, "triton", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "mixcon.ops.triton_chunk", raising=False)
    layer = Conba(MixConConfig.preset("tiny", conba_chunk=16, conba_kernel="triton"), 0)
    u = torch.randn(1, 5, 32)
    with torch.no_grad(), pytest.raises(ImportError, match=r"pip install 'mixcon\[triton\]'"):
        layer(u)
    assert layer(u).shape == (1, 5, 32)  # with autograd: the PyTorch chunked scan, no triton needed


def test_an_fp64_layer_asking_for_the_triton_kernel_keeps_fp64_precision(monkeypatch):
    """The kernel refuses fp64 (it computes in fp32): an fp64 forward without autograd scans with the PyTorch form
    instead, and equals the layer with conba_kernel='torch' to fp64 precision."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that the layer would take the kernel on a CPU
    torch.manual_seed(0)
    torch_layer = Conba(conba_config(), 0).double().eval()
    triton_layer = Conba(conba_config(conba_kernel="triton"), 0).double().eval()
    triton_layer.load_state_dict(torch_layer.state_dict())
    u = torch.randn(1, 12, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(triton_layer(u), torch_layer(u), rtol=1e-12, atol=1e-12)


def test_an_unbatched_input_is_refused_by_shape():
    layer = Conba(MixConConfig.preset("tiny"), 0)
    with pytest.raises(ValueError, match=r"Conba: input must be \(B, T, d_model=32\), got shape \(5, 32\)"):
        layer(torch.randn(5, 32))
    with pytest.raises(ValueError, match=r"Conba: input must be \(B, T, d_model=32\), got shape \(1, 5, 33\)"):
        layer(torch.randn(1, 5, 33))


def test_the_repr_shows_the_layers_settings():
    text = repr(Conba(MixConConfig.preset("tiny", conba_delay=3), 0))
    assert "heads=4, head_dim=16, state=8, groups=2, selective='swiglu', control=True, state_scaling=True, tau=3" \
        in text and "GatedRMSNorm(64, groups=2, eps=1e-05)" in text


def test_gated_norm_groups_must_divide_its_width():
    from mixcon.layers.norm import GatedRMSNorm

    for groups in (0, -2, 3):
        with pytest.raises(ValueError, match=rf"GatedRMSNorm: groups={groups} must be >= 1 and divide dim=64"):
            GatedRMSNorm(64, groups=groups)


def test_forwards_without_autograd_run_in_segments_with_the_same_result(tiny_model, monkeypatch):
    """Eager, a long sequence without autograd runs EAGER_SEGMENT steps at a time, chained through the conv tail
    and the states (the scan's intermediates of one segment alive at once): the same logits as one pass, with
    a cache, with left padding, and without either; packed documents (seq_idx) in one pass."""
    from mixcon.layers import conba

    model = tiny_model()
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 37))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    seq_idx = ((torch.arange(37) >= 13).long() + (torch.arange(37) >= 30).long()).expand(2, 37)  # 3 documents
    whole = [model(ids).logits.detach(), model(ids, attention_mask=mask).logits.detach(),  # autograd: one pass
             model(ids, seq_idx=seq_idx).logits.detach()]
    lengths = []
    mix = conba.Conba.mix
    monkeypatch.setattr(conba.Conba, "mix", lambda self, u, *a, **kw: lengths.append(u.shape[1]) or mix(self, u, *a,
                                                                                                         **kw))
    monkeypatch.setattr(conba, "EAGER_SEGMENT", 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, whole[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, whole[1], rtol=1e-10, atol=1e-10)
        cache = model.new_cache(2)
        torch.testing.assert_close(model(ids, cache=cache).logits, whole[0], rtol=1e-10, atol=1e-10)
        assert set(lengths) == {8, 5}  # 4 segments of 8 and the rest
        lengths.clear()
        model(ids[:, :8], cache=model.new_cache(2))  # one segment or less: `mix` on the whole
        assert set(lengths) == {8}
        lengths.clear()
        torch.testing.assert_close(model(ids, seq_idx=seq_idx).logits, whole[2], rtol=1e-10, atol=1e-10)
        assert set(lengths) == {37}  # packed documents: one pass (segments would not pass seq_idx on)


def test_packed_documents_never_go_to_the_triton_kernel(tiny_model, monkeypatch):
    """The kernel takes no seq_idx: a forward of packed documents scans with the PyTorch form, one without with
    the kernel."""
    import mixcon.ops.triton_chunk as triton_chunk

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that the layer takes the kernel on a CPU
    calls = []
    kernel = triton_chunk.conba_scan_triton
    monkeypatch.setattr(triton_chunk, "conba_scan_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    torch_model = tiny_model(dtype=torch.float32, conba_chunk=16)
    triton_model = tiny_model(dtype=torch.float32, conba_chunk=16, conba_kernel="triton")
    ids = torch.randint(0, 300, (1, 12))
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = triton_model(ids, seq_idx=seq_idx).logits
        assert calls == []
        torch.testing.assert_close(packed, torch_model(ids, seq_idx=seq_idx).logits)
        triton_model(ids)
    assert calls
