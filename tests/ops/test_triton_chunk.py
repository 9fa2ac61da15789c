"""The Triton chunked scan equals the sequential reference: on a GPU when there is one, else in Triton's
interpreter on the CPU."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from test_conba_scan import make_inputs  # tests/ops is on sys.path (pytest rootdir-less import)

from mixcon.ops import conba_scan_reference

pytest.importorskip("triton", reason="triton is not installed (pip install 'mixcon[triton]')")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU, conftest.py set TRITON_INTERPRET=1
from mixcon.ops.triton_chunk import conba_scan_triton, kernel_block, launch_options  # noqa: E402  (only with triton)


def on_device(kw: dict) -> dict:
    """The tensors of `kw` in fp32 on DEVICE, the rest as they are."""
    return {name: v.to(DEVICE, torch.float32) if isinstance(v, torch.Tensor) else v for name, v in kw.items()}

CASES = [
    # (T, chunk, G, tau, initial state, P, N)
    (37, 16, 2, 0, False, 5, 6),
    (37, 16, 2, 2, True, 5, 6),  # P, N below a 16-wide tile
    (1, 16, 2, 2, True, 5, 6),  # T < tau: past states come partly from the initial ones
    (64, 16, 4, 1, False, 16, 16),  # T a multiple of the chunk, G == H
    (50, 16, 1, 3, True, 20, 8),  # several chunks, G < H, tau 3
    (20, 32, 1, 2, True, 5, 6),  # one chunk longer than T
    (100, 64, 2, 2, True, 5, 6),  # a chunk above the kernel's block: it walks 32 steps at a time
    (80, 64, 1, 33, True, 5, 6),  # tau above the block: the block grows to the chunk
]


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
@pytest.mark.parametrize("T,chunk,G,tau,init,P,N", CASES)
def test_triton_equals_reference(delta_rule, T, chunk, G, tau, init, P, N):
    x, k, q, ld, beta, gain, S0 = make_inputs(T=T, G=G, P=P, N=N)
    past0 = torch.randn(2, tau, 4, P, N, dtype=torch.float64) if init else None
    kw = dict(delta_rule=delta_rule, tau=tau, delay_gain=gain if tau else None,
              initial_state=S0 if init else None, initial_past_states=past0)
    y_ref, s_ref, past_ref = conba_scan_reference(x, k, q, ld, beta, return_past_states=True, **kw)
    dev = on_device(kw)
    args = [t.to(DEVICE, torch.float32) for t in (x, k, q, ld, beta)]
    y, s, past = conba_scan_triton(*args, chunk_size=chunk, return_past_states=True, **dev)
    assert y.dtype == torch.float32 and y.shape == (2, T, 4, P)
    for got, ref in ((y, y_ref), (s, s_ref), (past, past_ref)):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value_block", [16, 32, 64])
def test_programs_over_value_columns_each_scan_their_own(value_block):
    """P = 40 split into blocks of 16 (three programs, the last one 8 columns short), 32 or one block of 64."""
    x, k, q, ld, beta, gain, S0 = make_inputs(T=40, G=2, P=40, N=24)
    past0 = torch.randn(2, 2, 4, 40, 24, dtype=torch.float64)
    kw = dict(delta_rule=True, tau=2, delay_gain=gain, initial_state=S0, initial_past_states=past0)
    refs = conba_scan_reference(x, k, q, ld, beta, return_past_states=True, **kw)
    dev = on_device(kw)
    outs = conba_scan_triton(*(t.to(DEVICE, torch.float32) for t in (x, k, q, ld, beta)), chunk_size=16,
                             return_past_states=True, value_block=value_block, **dev)
    for got, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
@pytest.mark.parametrize("strong", [-16.0, -150.0])  # (-150 acts as the floor, -100)
def test_weak_decays_after_strong_ones_keep_fp32_precision(delta_rule, strong):
    """As `conba_scan` (test_conba_scan.py), with strong decays ending inside the kernel's blocks of 32 steps (the
    second run of them before the last steps, whose states the decode cache keeps): differences of fp32 running
    sums of hundreds to thousands lost up to ~1e-3 there."""
    x, k, q, ld, beta, gain, S0 = make_inputs(B=1, T=64, H=2, G=1)
    ld = torch.full_like(ld, -1e-3)
    ld[:, :20] = strong
    ld[:, 40:52] = strong
    kw = dict(delta_rule=delta_rule, tau=2, delay_gain=gain, initial_state=S0)
    refs = conba_scan_reference(x, k, q, ld, beta, return_past_states=True, **kw)
    dev = on_device(kw)
    for chunk in (64, 16):
        outs = conba_scan_triton(*(t.to(DEVICE, torch.float32) for t in (x, k, q, ld, beta)), chunk_size=chunk,
                                 return_past_states=True, **dev)
        for got, ref in zip(outs, refs, strict=True):
            torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=3e-6)


def test_chunk_sizes_and_value_blocks_the_kernel_refuses():
    """Powers of two >= 16 (and a chunk >= tau, which a block must hold), named; chunk 16 at tau 16 runs (its block's
    last row reads the block's start state; the first 15 rows of the next block read states carried over)."""
    x, k, q, ld, beta, gain, S0 = make_inputs(T=40)
    args = [t.to(DEVICE, torch.float32) for t in (x, k, q, ld, beta)]
    gain = gain.to(DEVICE, torch.float32)
    for chunk, tau in ((8, 0), (48, 0), (32, 33)):
        with pytest.raises(ValueError, match=rf"chunk_size={chunk} must be a power of two >= 16 and >= tau={tau}$"):
            conba_scan_triton(*args, delta_rule=True, tau=tau, delay_gain=gain if tau else None, chunk_size=chunk)
    for value_block in (8, 24):
        with pytest.raises(ValueError, match=rf"value_block={value_block} must be a power of two >= 16$"):
            conba_scan_triton(*args, delta_rule=True, chunk_size=16, value_block=value_block)
    y, _ = conba_scan_triton(*args, delta_rule=True, tau=16, delay_gain=gain,
                             initial_state=S0.to(DEVICE, torch.float32), chunk_size=16)
    y_ref, _ = conba_scan_reference(x, k, q, ld, beta, delta_rule=True, tau=16, delay_gain=gain.double().cpu(),
                                    initial_state=S0)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-4, atol=1e-4)


def test_a_full_reset_mid_chunk_stays_finite_and_exact():
    """log_decay = -inf (alpha = 0): the kernel's cumulative decays are clamped as in `conba_scan`."""
    x, k, q, ld, beta, gain, S0 = make_inputs(T=40, G=2, P=16, N=16)
    ld = ld.clone()
    ld[:, 9] = float("-inf")
    kw = dict(delta_rule=True, tau=2, delay_gain=gain, initial_state=S0)
    y_ref, s_ref = conba_scan_reference(x, k, q, ld, beta, **kw)
    dev = on_device(kw)
    y, s = conba_scan_triton(*(t.to(DEVICE, torch.float32) for t in (x, k, q, ld, beta)), chunk_size=16, **dev)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double().cpu(), s_ref, rtol=1e-4, atol=1e-4)


def test_bf16_inputs_come_back_in_bf16():
    x, k, q, ld, beta, gain, S0 = make_inputs(T=40, G=2, P=16, N=16)
    y_ref, s_ref = conba_scan_reference(x, k, q, ld, beta, delta_rule=True, tau=2, delay_gain=gain, initial_state=S0)
    low = [t.to(DEVICE, torch.bfloat16 if i < 3 else torch.float32) for i, t in enumerate((x, k, q, ld, beta))]
    y, s = conba_scan_triton(*low, delta_rule=True, tau=2, delay_gain=gain.to(DEVICE, torch.float32),
                             initial_state=S0.to(DEVICE, torch.float32), chunk_size=16)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert float((y.double().cpu() - y_ref).norm() / y_ref.norm()) < 3e-2
    assert float((s.double().cpu() - s_ref).norm() / s_ref.norm()) < 3e-2


def test_bad_arguments_raise_clear_errors():
    x, k, q, ld, beta, *_ = (t.float() for t in make_inputs(T=8))
    with pytest.raises(ValueError, match="power of two"):
        conba_scan_triton(x, k, q, ld, beta, delta_rule=False, chunk_size=24)
    for value_block in (24, 16.0):  # (a float failed in a bitwise and)
        with pytest.raises(ValueError, match=f"value_block={value_block} must be a power of two >= 16"):
            conba_scan_triton(x, k, q, ld, beta, delta_rule=False, chunk_size=16, value_block=value_block)
    with pytest.raises(ValueError, match="fp64"):
        conba_scan_triton(x.double(), k, q, ld, beta, delta_rule=False, chunk_size=16)
    with pytest.raises(RuntimeError, match="no backward"):
        conba_scan_triton(x.requires_grad_(), k, q, ld, beta, delta_rule=False, chunk_size=16)
    x.requires_grad_(False)
    B, _, H, P = x.shape
    for grad_of in ("initial_state", "initial_past_states"):  # any input autograd records, the past states' too
        states = dict(initial_state=torch.zeros(B, H, P, k.shape[-1]), initial_past_states=torch.zeros(B, 2, H, P,
                                                                                                     k.shape[-1]))
        states[grad_of].requires_grad_()
        with pytest.raises(RuntimeError, match="no backward"):
            conba_scan_triton(x, k, q, ld, beta, delta_rule=False, tau=2, delay_gain=torch.ones(H), chunk_size=16,
                              **states)


def test_launch_options_follow_the_chunk_tau_and_torch_matmul_precision():
    assert [kernel_block(c, tau) for c, tau in ((16, 2), (32, 2), (64, 2), (128, 0), (64, 33), (128, 40))] == \
        [16, 32, 32, 32, 64, 64]
    assert launch_options(torch.float32, 5, 64, 32) | {"PREC": None} == \
        dict(C=32, BP=16, BN=64, PREC=None, num_warps=8, enable_fp_fusion=True)
    assert [launch_options(torch.float32, P, 64, 32, vb)["BP"] for P, vb in ((64, 16), (64, 64), (40, 64), (5, 32))] \
        == [16, 64, 64, 16]
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert launch_options(torch.float32, 64, 64, 32)["PREC"] == "ieee"
        assert launch_options(torch.bfloat16, 64, 64, 32)["PREC"] == "tf32"
        torch.set_float32_matmul_precision("high")
        assert launch_options(torch.float32, 64, 64, 32)["PREC"] == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_model_with_the_triton_kernel_equals_the_torch_one(monkeypatch):
    """Full forward and prefill + cached decode of a tiny MixCon, conba_kernel 'triton' vs 'torch'."""
    from mixcon import MixConConfig, MixConForCausalLM
    from mixcon.ops import triton_chunk

    calls = []
    monkeypatch.setattr(triton_chunk, "conba_scan_triton",
                        lambda *a, **kw: calls.append(1) or conba_scan_triton(*a, **kw))
    torch.manual_seed(0)
    config = MixConConfig.preset("tiny", conba_chunk=16)
    ref = MixConForCausalLM(config).to(DEVICE).eval()
    with torch.no_grad():  # the delayed readout counts (its gain starts at 0)
        for name, p in ref.named_parameters():
            if name.endswith("delay_gain"):
                p.uniform_(0.5, 1.0)
    fast = MixConForCausalLM(config.replace(conba_kernel="triton")).to(DEVICE).eval()
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 40), device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        cache = fast.new_cache(2, max_length=40)
        pieces = [fast(ids[:, :23], cache=cache).logits]
        pieces += [fast(ids[:, t:t + 1], cache=cache).logits for t in range(23, 40)]
        torch.testing.assert_close(torch.cat(pieces, 1), ref(ids).logits, rtol=1e-4, atol=1e-4)
    n_conba = sum(layer.mixer_kind == "conba" for layer in fast.layers)
    assert len(calls) == 2 * n_conba  # the full forward and the prefill; decoding takes the step form
    fast(ids, labels=ids).loss.backward()  # with autograd: the PyTorch chunked scan
    assert len(calls) == 2 * n_conba
    with torch.no_grad():  # fp64: the PyTorch scan too (the kernel computes in fp32)
        torch.testing.assert_close(fast.double()(ids).logits, ref.double()(ids).logits, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2 * n_conba
    conba = [layer.mixer for layer in fast.layers if layer.mixer_kind == "conba"]
    assert all(p.grad is not None for m in conba for p in m.parameters())


def test_forward_mode_tangents_take_the_torch_scan():
    """Under no_grad, a Conba layer with the kernel gives forward-AD and torch.func.jvp tangents equal to the torch
    scan's (the kernel dropped them silently, or failed inside torch.func); the kernel itself refuses tangents."""
    import torch.autograd.forward_ad as fwAD

    from mixcon import MixConConfig
    from mixcon.layers.conba import Conba

    torch.manual_seed(0)
    config = MixConConfig.preset("tiny", conba_chunk=16)
    ref = Conba(config, 0).to(DEVICE).eval()
    fast = Conba(config.replace(conba_kernel="triton"), 0).to(DEVICE).eval()
    fast.load_state_dict(ref.state_dict())
    u, tangent = (torch.randn(2, 20, config.d_model, device=DEVICE) for _ in range(2))
    with torch.no_grad():
        tangents = []
        for layer in (ref, fast):
            with fwAD.dual_level():
                tangents.append(fwAD.unpack_dual(layer(fwAD.make_dual(u, tangent))).tangent)
            tangents.append(torch.func.jvp(layer, (u,), (tangent,))[1])
        for got in tangents[1:]:
            torch.testing.assert_close(got, tangents[0], rtol=1e-4, atol=1e-4)
        x, k, q, ld, beta, *_ = (t.to(DEVICE, torch.float32) for t in make_inputs(T=8))
        with fwAD.dual_level(), pytest.raises(RuntimeError, match="no forward-mode AD tangents"):
            conba_scan_triton(fwAD.make_dual(x, torch.ones_like(x)), k, q, ld, beta, delta_rule=False, chunk_size=16)


@pytest.mark.skipif(DEVICE != "cpu" or not sys.platform.startswith("linux")
                    or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") < 16 * 2**30,
                    reason="views 2^32 elements into lazily mapped CPU buffers (Linux, >= 16 GB of RAM)")
def test_time_offsets_past_2_to_the_31_do_not_wrap():
    """One row of T·H·P >= 2^31 elements (a long prefill of a wide model): rows t·H·P >= 2^31 were read and written
    2^32 elements away (int32 offsets). Only the program of head 0 runs; x and y are views 2^32 elements into
    buffers the kernel never touches elsewhere (untouched pages cost no memory), so a wrapped address lands there."""
    from mixcon.ops.triton_chunk import _conba_scan_kernel

    B, T, H, P, N, tau, wrap = 1, 1040, 2**17, 16, 16, 2, 2**32

    def far_view(*shape: int) -> torch.Tensor:  # (the buffer stays alive through the view's base)
        return torch.empty(wrap + math.prod(shape), dtype=torch.bfloat16)[wrap:].view(shape)

    x, y = far_view(B, T, H, P), far_view(B, T, H, P)
    g = torch.Generator().manual_seed(0)
    x[0, :, 0] = torch.randn(T, P, generator=g).bfloat16()
    y[0, :, 0] = float("nan")
    k, q = (F.normalize(torch.randn(B, T, 1, N, generator=g), dim=-1) for _ in range(2))
    ld, beta = torch.empty(B, T, H), torch.empty(B, T, H)
    ld[0, :, 0] = -torch.rand(T, generator=g) * 0.05
    beta[0, :, 0] = torch.rand(T, generator=g)
    gain, S0, final = torch.full((H,), 0.5), torch.zeros(B, H, P, N), torch.zeros(B, H, P, N)
    _conba_scan_kernel[(1, 1, 1)](
        x, k, q, ld, beta, gain, S0, y, final, torch.zeros(1), T, H, P, N, H,
        x.stride(0), x.stride(1), x.stride(2), k.stride(0), k.stride(1), k.stride(2),
        ld.stride(0), ld.stride(1), y.stride(0), y.stride(1), y.stride(2),
        DELTA=True, TAU=tau, PAST=False, **launch_options(torch.bfloat16, P, N, kernel_block(64, tau)))
    y_ref, s_ref = conba_scan_reference(x[:, :, :1].double(), k.double(), q.double(), ld[:, :, :1].double(),
                                        beta[:, :, :1].double(), delta_rule=True, tau=tau, delay_gain=gain[:1].double())
    assert 2**31 // (H * P) < T  # (rows from 1024 on lie past 2^31)
    torch.testing.assert_close(y[0, :, 0].double(), y_ref[0, :, 0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(final[0, 0].double(), s_ref[0, 0], rtol=1e-5, atol=1e-5)
