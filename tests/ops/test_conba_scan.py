"""The three implementations of the Conba scan contract agree: chunked == reference == step; packed documents
(seq_idx) are scanned as if alone."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mixcon.ops import conba_scan, conba_scan_reference, conba_scan_step


def make_inputs(B=2, T=37, H=4, P=5, G=2, N=6, dtype=torch.float64, seed=0, normalize=True, beta_max=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, dtype=dtype, generator=g)
    k = torch.randn(B, T, G, N, dtype=dtype, generator=g)
    if normalize:
        k = torch.nn.functional.normalize(k, dim=-1)
    q = torch.randn(B, T, G, N, dtype=dtype, generator=g)
    log_decay = -torch.rand(B, T, H, dtype=dtype, generator=g) * 0.5
    beta = beta_max * torch.rand(B, T, H, dtype=dtype, generator=g)
    gain = torch.randn(H, dtype=dtype, generator=g)
    S0 = torch.randn(B, H, P, N, dtype=dtype, generator=g)
    return x, k, q, log_decay, beta, gain, S0


def run_steps(x, k, q, log_decay, beta, *, delta_rule, tau, gain, S0, past0=None):
    """Drive conba_scan_step token by token, keeping the last tau states as a decoder would."""
    B, T, H, P = x.shape
    N = k.shape[-1]
    S = S0 if S0 is not None else x.new_zeros(B, H, P, N)
    history = list(past0.unbind(1)) if past0 is not None else [S] * tau
    ys = []
    for t in range(T):
        y, S = conba_scan_step(x[:, t], k[:, t], q[:, t], log_decay[:, t], beta[:, t], S, delta_rule=delta_rule,
                               delay_gain=gain if tau else None, delayed_state=history[0] if tau else None)
        if tau:
            history = [*history[1:], S]
        ys.append(y)
    return torch.stack(ys, 1), S


CASES = [
    # (T, chunk, G, tau, initial states: None, "state" (S_0) or "past" (S_0 and S_{1-tau} .. S_0), beta_max)
    (37, 8, 2, 0, None, 1.0),
    (37, 8, 2, 2, "state", 1.0),
    (1, 8, 2, 2, "state", 1.0),
    (64, 16, 4, 1, None, 1.0),  # T a multiple of the chunk, G == H
    (20, 64, 1, 3, "state", 1.0),  # one chunk longer than T, G < H
    (9, 4, 2, 5, "state", 1.0),  # tau longer than a chunk
    (21, 4, 2, 4, "past", 1.0),  # tau as long as a chunk
    (30, 8, 2, 3, "past", 2.0),  # the largest gain the layer allows
    (13, 1, 2, 2, "past", 2.0),  # chunks of one step
    (2, 8, 2, 4, "past", 1.0),  # fewer steps than tau: past states from the initial ones
]


def initial_past_states(S0: torch.Tensor, tau: int, seed: int = 1) -> torch.Tensor:
    """S_{1-tau} .. S_0 (B, tau, H, P, N): random earlier states, then S0."""
    g = torch.Generator().manual_seed(seed)
    earlier = torch.randn(S0.shape[0], tau - 1, *S0.shape[1:], dtype=S0.dtype, generator=g)
    return torch.cat([earlier, S0[:, None]], dim=1)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
@pytest.mark.parametrize("T,chunk,G,tau,init,beta_max", CASES)
def test_chunked_equals_reference_and_step_fp64(delta_rule, T, chunk, G, tau, init, beta_max):
    x, k, q, ld, beta, gain, S0 = make_inputs(T=T, G=G, beta_max=beta_max)
    S0 = S0 if init else None
    past0 = initial_past_states(S0, tau) if init == "past" else None
    kw = dict(delta_rule=delta_rule, tau=tau, delay_gain=gain if tau else None, initial_state=S0,
              initial_past_states=past0)
    y_ref, s_ref, past_ref = conba_scan_reference(x, k, q, ld, beta, return_past_states=True, **kw)
    y, s, past = conba_scan(x, k, q, ld, beta, chunk_size=chunk, return_past_states=True, **kw)
    y_step, s_step = run_steps(x, k, q, ld, beta, delta_rule=delta_rule, tau=tau, gain=gain, S0=S0, past0=past0)
    assert y.shape == (2, T, 4, 5) and s.shape == (2, 4, 5, 6) and past.shape == (2, tau, 4, 5, 6)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(past, past_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y_step, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s_step, s_ref, rtol=1e-9, atol=1e-9)
    if tau:
        torch.testing.assert_close(past[:, -1], s_ref)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
@pytest.mark.parametrize("tau,chunk", [(2, 8), (4, 4), (5, 4)],
                         ids=["tau-inside-chunks", "tau-a-chunk", "tau-past-a-chunk"])
def test_gradients_match_reference_fp64(delta_rule, tau, chunk):
    inputs = make_inputs(T=19, G=2, beta_max=2.0)
    inputs = [t.requires_grad_() for t in (*inputs, initial_past_states(inputs[-1], tau)[:, :-1].clone())]
    x, k, q, ld, beta, gain, S0, earlier = inputs
    kw = dict(delta_rule=delta_rule, tau=tau, delay_gain=gain, initial_state=S0,
              initial_past_states=torch.cat([earlier, S0[:, None]], dim=1))
    w = torch.randn(2, 19, 4, 5, dtype=torch.float64)
    grads = []
    for fn, extra in ((conba_scan_reference, {}), (conba_scan, {"chunk_size": chunk})):
        y, s = fn(x, k, q, ld, beta, **kw, **extra)
        loss = (y * w).sum() + s.square().sum()
        first = torch.autograd.grad(loss, inputs, create_graph=True)
        # ... and second order (the delta rule's triangular inverse has a hand-written gradient)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), (x, k, ld, beta))
        grads.append((*first, *second))
    for g_ref, g in zip(*grads, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
def test_fp32_within_tolerance(delta_rule):
    x, k, q, ld, beta, gain, S0 = make_inputs(T=150, G=2)
    kw = dict(delta_rule=delta_rule, tau=2, delay_gain=gain, initial_state=S0)
    y_ref, s_ref = conba_scan_reference(x, k, q, ld, beta, **kw)
    f = [t.float() for t in (x, k, q, ld, beta)]
    y, s = conba_scan(*f, chunk_size=64, **{**kw, "delay_gain": gain.float(), "initial_state": S0.float()})
    assert y.dtype == torch.float32
    rel = (y.double() - y_ref).norm() / y_ref.norm()
    assert rel < 1e-4, rel
    assert (s.double() - s_ref).norm() / s_ref.norm() < 1e-4


def test_initial_past_states_continue_a_split_sequence():
    """Scanning [a, b] equals scanning a, then b from a's final and past states."""
    x, k, q, ld, beta, gain, _ = make_inputs(T=30)
    kw = dict(delta_rule=True, tau=3, delay_gain=gain, chunk_size=8)
    y_full, s_full = conba_scan(x, k, q, ld, beta, **kw)
    cut = 11
    y1, s1, past1 = conba_scan(x[:, :cut], k[:, :cut], q[:, :cut], ld[:, :cut], beta[:, :cut],
                               return_past_states=True, **kw)
    y2, s2 = conba_scan(x[:, cut:], k[:, cut:], q[:, cut:], ld[:, cut:], beta[:, cut:], initial_state=s1,
                        initial_past_states=past1, **kw)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s2, s_full, rtol=1e-9, atol=1e-9)


def test_delay_term_uses_the_state_tau_steps_back():
    """With a nonzero gain the output changes, and exactly as g · S_{t-tau} q_t."""
    x, k, q, ld, beta, gain, _ = make_inputs(T=12)
    y0, _ = conba_scan_reference(x, k, q, ld, beta, delta_rule=False)
    y2, _ = conba_scan(x, k, q, ld, beta, delta_rule=False, tau=2, delay_gain=gain, chunk_size=4)
    # S_t for every t from the reference at tau=0, read with q_t.
    states = [torch.zeros(2, 4, 5, 6, dtype=torch.float64)]
    for t in range(12):
        _, s = conba_scan_reference(x[:, : t + 1], k[:, : t + 1], q[:, : t + 1], ld[:, : t + 1], beta[:, : t + 1],
                                    delta_rule=False)
        states.append(s)
    kh = q.repeat_interleave(2, dim=2)
    for t in range(12):
        S_delayed = states[max(t + 1 - 2, 0)]
        expect = y0[:, t] + gain[:, None] * torch.einsum("bhpn,bhn->bhp", S_delayed, kh[:, t])
        torch.testing.assert_close(y2[:, t], expect, rtol=1e-9, atol=1e-9)


def test_delta_rule_stores_a_key_value_association():
    """With beta = 1, no decay and orthonormal keys, S k_i recovers x_i exactly."""
    N = P = 4
    keys = torch.eye(N, dtype=torch.float64)[None, :, None, :]  # (1, T=4, G=1, N)
    x = torch.randn(1, 4, 1, P, dtype=torch.float64)
    zeros = torch.zeros(1, 4, 1, dtype=torch.float64)
    _, S = conba_scan(x, keys, keys, zeros, zeros + 1, delta_rule=True)
    torch.testing.assert_close(S[0, 0] @ keys[0, :, 0].T, x[0, :, 0].T)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("target", ["state", "delayed"])
def test_step_writes_into_out_even_when_it_aliases_an_input(target, grad):
    """A decoder writes S_t over the slot it reads (S_{t-1}, or S_{t-tau} of its ring): same result."""
    x, k, q, ld, beta, gain, S0 = make_inputs(T=1)
    delayed = S0.flip(0).contiguous()
    args = (x[:, 0], k[:, 0], q[:, 0], ld[:, 0], beta[:, 0])
    y_ref, s_ref = conba_scan_step(*args, S0, delta_rule=True, delay_gain=gain, delayed_state=delayed)
    state, old = S0.clone(), delayed.clone()
    out = state if target == "state" else old
    with torch.set_grad_enabled(grad):
        y, s = conba_scan_step(*args, state, delta_rule=True, delay_gain=gain, delayed_state=old, out=out)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, s_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("target", ["state", "delayed"])
def test_step_gradients_with_out_aliasing_an_input(target):
    """With autograd, writing S_t over a state the step read leaves the gradients as without `out`."""
    x, k, q, ld, beta, gain, S0 = make_inputs(T=1)
    leaves = [t.clone().requires_grad_() for t in (x[:, 0], k[:, 0], q[:, 0], S0, S0.flip(0))]

    def grads(use_out: bool) -> list[torch.Tensor]:
        x1, k1, q1, s1, d1 = leaves
        state, old = s1 * 1, d1 * 1  # non-leaves: a leaf that needs a gradient cannot be written in place
        out = (state if target == "state" else old) if use_out else None
        y, s = conba_scan_step(x1, k1, q1, ld[:, 0], beta[:, 0], state, delta_rule=True, delay_gain=gain,
                               delayed_state=old, out=out)
        return torch.autograd.grad((y * y).sum() + (s * s).sum(), leaves)

    for got, expected in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_step_under_autograd_writes_out_into_the_tensor_whose_slots_it_reads():
    """A decode cache's ring (Conba.decode, tau > 0): S_{t-1}, S_{t-tau} and the slot S_t goes to are views of one
    tensor; written in place there, the saved states must be copies (a view's version is its base's)."""
    x, k, q, ld, beta, gain, S0 = make_inputs(T=1)
    leaves = [t.clone().requires_grad_() for t in (x[:, 0], k[:, 0], ld[:, 0])]

    def grads(use_out: bool) -> list[torch.Tensor]:
        ring = torch.stack([S0, S0.flip(0), S0 * 0.5])  # (3, B, H, P, N)
        y, s = conba_scan_step(leaves[0], leaves[1], q[:, 0], leaves[2], beta[:, 0], ring[0], delta_rule=True,
                               delay_gain=gain, delayed_state=ring[1], out=ring[2] if use_out else None)
        return torch.autograd.grad((y * y).sum() + (s * s).sum(), leaves)

    for got, expected in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_step_with_bf16_inputs_keeps_its_state_in_fp32():
    """bf16 x, k, q (a bf16 model's decoding step) with fp32 decays, gains and states: y in bf16, S_t in fp32,
    both as the fp64 step gives them to bf16's rounding of the inputs."""
    x, k, q, ld, beta, gain, S0 = make_inputs(T=1)
    args = [t[:, 0] for t in (x, k, q)]
    low = [t.bfloat16() for t in args]
    y_ref, s_ref = conba_scan_step(*(t.double() for t in low), ld[:, 0], beta[:, 0], S0, delta_rule=True,
                                   delay_gain=gain, delayed_state=S0.flip(0))
    y, s = conba_scan_step(*low, ld[:, 0].float(), beta[:, 0].float(), S0.float(), delta_rule=True,
                           delay_gain=gain.float(), delayed_state=S0.flip(0).float())
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fn", [conba_scan, conba_scan_reference], ids=["chunked", "reference"])
def test_outputs_come_back_in_the_inputs_dtype_and_states_in_fp32(fn):
    """y in x's dtype (fp32, or bf16 for bf16 x, k, q), the states in fp32 (the decays', at least fp32)."""
    x, k, q, ld, beta, gain, _ = make_inputs(T=10)
    for dtype in (torch.float32, torch.bfloat16):
        y, s, past = fn(x.to(dtype), k.to(dtype), q.to(dtype), ld.float(), beta.float(), delta_rule=True, tau=2,
                        delay_gain=gain.float(), return_past_states=True)
        assert (y.dtype, s.dtype, past.dtype) == (dtype, torch.float32, torch.float32)


def test_step_reads_states_with_a_strided_batch():
    """States sliced out of a (B, R, H, P, N) stack (batch stride R·H·P·N) are read as they are."""
    x, k, q, ld, beta, gain, S0 = make_inputs(T=1)
    ring = torch.stack([S0, S0.flip(0)], dim=1)  # (B, 2, H, P, N)
    args = (x[:, 0], k[:, 0], q[:, 0], ld[:, 0], beta[:, 0])
    y_ref, s_ref = conba_scan_step(*args, S0, delta_rule=True, delay_gain=gain,
                                   delayed_state=S0.flip(0).contiguous())
    y, s = conba_scan_step(*args, ring[:, 0], delta_rule=True, delay_gain=gain, delayed_state=ring[:, 1])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
@pytest.mark.parametrize("spike", [-30.0, -300.0, float("-inf")])
def test_a_reset_or_a_huge_decay_mid_chunk_stays_exact(delta_rule, spike):
    """log_decay = -inf (a full reset: alpha = 0) or far below zero: the chunked form, which works with
    differences of cumulative log decays, matches the reference loop in fp32 as for ordinary decays."""
    x, k, q, ld, beta, gain, S0 = make_inputs(T=37)
    ld = ld.clone()
    ld[:, 5], ld[0, 20, 1] = spike, spike
    kw = dict(delta_rule=delta_rule, tau=2, delay_gain=gain, initial_state=S0)
    y_ref, s_ref = conba_scan_reference(x, k, q, ld, beta, **kw)
    y, s = conba_scan(*(t.float() for t in (x, k, q, ld, beta)), chunk_size=16,
                      **{n: v.float() if isinstance(v, torch.Tensor) else v for n, v in kw.items()})
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(s.double(), s_ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
def test_a_strong_decay_above_the_floor_is_no_reset_fp64(delta_rule):
    """A log decay of -80 lies above LOG_DECAY_FLOOR (-100): the chunked and step forms keep the exp(-80) it leaves
    of the state, as the loop does (an initial state of size exp(80) makes that part O(1))."""
    x, k, q, ld, beta, gain, S0 = make_inputs(T=12)
    ld = ld.clone()
    ld[:, 3] = -80.0
    S0 = S0 * np.exp(80.0)
    kw = dict(delta_rule=delta_rule, tau=2, delay_gain=gain, initial_state=S0)
    y_ref, s_ref = conba_scan_reference(x, k, q, ld, beta, **kw)
    y, s = conba_scan(x, k, q, ld, beta, chunk_size=8, **kw)
    y_step, s_step = run_steps(x, k, q, ld, beta, delta_rule=delta_rule, tau=2, gain=gain, S0=S0)
    for got in (y, y_step):
        torch.testing.assert_close(got, y_ref, rtol=1e-9, atol=1e-9)
    for got in (s, s_step):
        torch.testing.assert_close(got, s_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
@pytest.mark.parametrize("strong", [-16.0, -150.0])
def test_weak_decays_after_strong_ones_keep_fp32_precision(delta_rule, strong):
    """Half a chunk of strong decays (Δ·A = 16 lies inside Mamba-2's initial range), then weak ones: the
    cumulative log decay reaches hundreds, and the decays between later steps must not be read off
    differences of such sums in fp32 (a chunk size would then change the result by ~1e-4)."""
    x, k, q, ld, beta, gain, S0 = make_inputs(B=1, T=64, H=2, G=1)
    ld = torch.full_like(ld, -1e-3)
    ld[:, :32] = strong
    y_ref, s_ref, past_ref = conba_scan_reference(x, k, q, ld, beta, delta_rule=delta_rule, tau=2, delay_gain=gain,
                                                  initial_state=S0, return_past_states=True)
    for chunk in (64, 8):
        y, s, past = conba_scan(*(t.float() for t in (x, k, q, ld, beta)), chunk_size=chunk, delta_rule=delta_rule,
                                tau=2, delay_gain=gain.float(), initial_state=S0.float(), return_past_states=True)
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=3e-6)
        torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=3e-6)
        torch.testing.assert_close(past.double(), past_ref, rtol=1e-5, atol=3e-6)  # the decode cache's ring


@pytest.mark.parametrize("fn", [conba_scan, conba_scan_reference], ids=["chunked", "reference"])
def test_no_steps_return_the_states_in_tensors_of_their_own(fn):
    """T = 0: the states come back unchanged, contiguous, and not sharing memory with the caller's (a decode
    cache writes its ring in place)."""
    x, k, q, ld, beta, gain, S0 = make_inputs(T=0)
    past0 = torch.stack([S0 * 0.5, S0], dim=1)
    for initial_past in (None, past0):
        y, s, past = fn(x, k, q, ld, beta, delta_rule=True, tau=2, delay_gain=gain, initial_state=S0,
                        initial_past_states=initial_past, return_past_states=True)
        assert y.shape[1] == 0 and torch.equal(s, S0) and torch.equal(past[:, -1], S0)
        assert past.is_contiguous() and s.untyped_storage().data_ptr() != S0.untyped_storage().data_ptr()
        assert initial_past is None or past.untyped_storage().data_ptr() != past0.untyped_storage().data_ptr()
        past.add_(1)
        assert torch.equal(S0, make_inputs(T=0)[-1])  # the caller's state is untouched


def test_step_takes_inputs_of_any_layout():
    """Each input of the step may be a permuted view (the step wrote `beta * x` through a view: x or beta in another
    layout raised)."""
    x, k, q, ld, beta, _, S0 = make_inputs(T=1)
    args = dict(x=x[:, 0], k=k[:, 0], q=q[:, 0], log_decay=ld[:, 0], beta=beta[:, 0], state=S0)

    def permuted(t: torch.Tensor) -> torch.Tensor:  # same values, memory in reversed dimension order
        return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))

    for delta_rule in (False, True):
        y_ref, s_ref = conba_scan_step(**args, delta_rule=delta_rule)
        for name in args:
            y, s = conba_scan_step(**{**args, name: permuted(args[name])}, delta_rule=delta_rule)
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


def test_outputs_are_contiguous_in_their_documented_order():
    """y is (B, T, H, P) in that memory order from every form, at any chunking (the chunked form returned a permuted
    view of its padded chunks: `.view` on it failed where the reference's worked)."""
    x, k, q, ld, beta, gain, _ = make_inputs(T=10)
    for fn, chunk in ((conba_scan_reference, 4), (conba_scan, 4), (conba_scan, 64)):
        for tau, kw in ((0, {}), (2, dict(delay_gain=gain))):
            y, s, past = fn(x, k, q, ld, beta, delta_rule=True, tau=tau, chunk_size=chunk, return_past_states=True,
                            **kw)
            assert y.is_contiguous() and s.is_contiguous() and past.is_contiguous(), (fn.__name__, chunk, tau)


def test_step_takes_a_transposed_state_with_and_without_gradients():
    x, k, q, ld, beta, _, S0 = make_inputs(T=1)
    args = (x[:, 0], k[:, 0], q[:, 0], ld[:, 0], beta[:, 0])
    y_ref, s_ref = conba_scan_step(*args, S0, delta_rule=True)
    strided = S0.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, (P, N) not contiguous
    y, s = conba_scan_step(*args, strided, delta_rule=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    y, _ = conba_scan_step(*args, strided.requires_grad_(), delta_rule=True)
    y.sum().backward()
    assert strided.grad is not None and strided.grad.shape == S0.shape


def test_bad_shapes_raise_clear_errors():
    x, k, q, ld, beta, _, S0 = make_inputs()
    with pytest.raises(ValueError, match=r"tau=2 > 0 needs delay_gain of shape \(H,\)=\(4,\), got none"):
        conba_scan(x, k, q, ld, beta, delta_rule=False, tau=2)
    with pytest.raises(ValueError, match=r"tau=2 > 0 needs delay_gain of shape \(H,\)=\(4,\), got shape \(1, 4\)"):
        conba_scan(x, k, q, ld, beta, delta_rule=False, tau=2, delay_gain=torch.ones(1, 4, dtype=x.dtype))
    with pytest.raises(ValueError, match="must divide"):
        conba_scan(x, k[:, :, :1].expand(-1, -1, 3, -1), q[:, :, :1].expand(-1, -1, 3, -1), ld, beta,
                   delta_rule=False)
    with pytest.raises(ValueError, match="initial_state"):
        conba_scan(x, k, q, ld, beta, delta_rule=False, initial_state=S0[:1])
    with pytest.raises(ValueError, match="log_decay"):
        conba_scan(x, k, q, ld[:, :-1], beta, delta_rule=False)
    for fn in (conba_scan, conba_scan_reference):  # one contract: the same arguments refused by every form
        for bad in (0, -3, True, 2.5, torch.tensor(2)):
            with pytest.raises(ValueError, match=rf"chunk_size={re.escape(repr(bad))} must be a Python int >= 1"):
                fn(x, k, q, ld, beta, delta_rule=False, chunk_size=bad)
        for bad in (1.0, -1, np.int64(2)):
            with pytest.raises(ValueError, match=rf"tau={re.escape(repr(bad))} must be a Python int >= 0"):
                fn(x, k, q, ld, beta, delta_rule=False, tau=bad, delay_gain=torch.ones(4, dtype=x.dtype))
        with pytest.raises(ValueError, match=r"initial_past_states must be \(B, tau, H, P, N\)=\(2, 2, 4, 5, 6\), "
                           r"got \(2, 3, 4, 5, 6\)"):
            fn(x, k, q, ld, beta, delta_rule=False, tau=2, delay_gain=torch.ones(4, dtype=x.dtype), initial_state=S0,
               initial_past_states=S0[:, None].expand(-1, 3, -1, -1, -1))
        with pytest.raises(ValueError, match=r"k and q must both be \(B=2, T=37, G, N\), got \(1, 37, 2, 6\)"):
            fn(x, k[:1], q[:1], ld, beta, delta_rule=False)  # (would broadcast over the batch)
        # integer inputs truncated the outputs; a gain without a delay was ignored
        for i, name in enumerate(("x", "k", "q", "log_decay", "beta")):
            args = [x, k, q, ld, beta]
            args[i] = args[i].round().long()
            with pytest.raises(ValueError, match=rf"{name} must be a floating-point tensor, got torch.int64"):
                fn(*args, delta_rule=False)
        with pytest.raises(ValueError, match=r"delay_gain without a delay \(tau=0\) would be ignored"):
            fn(x, k, q, ld, beta, delta_rule=False, delay_gain=torch.ones(4, dtype=x.dtype))


def test_bad_step_shapes_raise_clear_errors():
    x, k, q, ld, beta, gain, S0 = make_inputs()
    args = dict(x=x[:, 0], k=k[:, 0], q=q[:, 0], log_decay=ld[:, 0], beta=beta[:, 0], state=S0)
    for name, bad, match in [
        ("beta", beta[:, 0, :2], r"beta must be \(B, H\)=\(2, 4\), got \(2, 2\)"),
        ("log_decay", ld[:, :2, 0], r"log_decay must be \(B, H\)"),
        ("k", k[:, 0, :, :3], r"k and q must both be \(B=2, G, N\)"),
        ("x", x[0, 0], r"x must be \(B, H, P\)"),
        ("state", S0[:, :2], r"state must be \(2, 4, 5, 6\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            conba_scan_step(**{**args, name: bad}, delta_rule=True)
    for G in (3, 0):  # (G=0 was a ZeroDivisionError)
        with pytest.raises(ValueError, match=rf"G={G} must divide the number of heads H=4"):
            conba_scan(x, k[:, :, :1].repeat(1, 1, G, 1), q[:, :, :1].repeat(1, 1, G, 1), ld, beta, delta_rule=False)
    with pytest.raises(ValueError, match=r"G=3 must divide the number of heads H=4"):
        conba_scan_step(**{**args, "k": k[:, 0, :1].expand(-1, 3, -1), "q": q[:, 0, :1].expand(-1, 3, -1)},
                        delta_rule=True)
    with pytest.raises(ValueError, match=r"delay_gain must be \(H,\)=\(4,\)"):
        conba_scan_step(**args, delta_rule=True, delay_gain=gain[:2], delayed_state=S0)
    with pytest.raises(ValueError, match=r"delayed_state must be \(2, 4, 5, 6\), got \(2, 4, 6, 5\)"):  # (its size
        conba_scan_step(**args, delta_rule=True, delay_gain=gain, delayed_state=S0.transpose(-1, -2))  # is the same)
    for extra in (dict(delay_gain=gain), dict(delayed_state=S0)):  # one without the other would be ignored
        with pytest.raises(ValueError, match="delay_gain and delayed_state go together"):
            conba_scan_step(**args, delta_rule=True, **extra)
    for grad in (False, True):
        for out in (torch.empty(0, dtype=S0.dtype), S0.transpose(-1, -2).contiguous().transpose(-1, -2)):
            with torch.set_grad_enabled(grad), pytest.raises(
                    ValueError, match=r"out must be a contiguous \(2, 4, 5, 6\) tensor"):
                conba_scan_step(**args, delta_rule=True, out=out)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype,autocast,tol", [(torch.float32, False, 1e-4), (torch.bfloat16, False, 3e-2),
                                                (torch.float32, True, 3e-2)], ids=["fp32", "bf16", "bf16-autocast"])
@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
def test_fp32_and_bf16_match_fp64_reference_forward_and_backward(delta_rule, dtype, autocast, tol, device):
    """x/k/q in `dtype` (decays, gains and states in fp32, as the layer passes them), on the CPU and a GPU; under
    bf16 autocast the products run in bf16 while decays, states and outputs stay fp32, as in Mamba-2's kernels."""
    inputs = [t.requires_grad_() for t in make_inputs(T=150, G=2)]
    x, k, q, ld, beta, gain, S0 = inputs
    kw = dict(delta_rule=delta_rule, tau=2)
    y_ref, s_ref = conba_scan_reference(x, k, q, ld, beta, delay_gain=gain, initial_state=S0, **kw)
    w = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad((y_ref * w).sum() + s_ref.sum(), inputs)
    dev = [t.detach().to(device, dtype if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(inputs)]
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        y, s = conba_scan(*dev[:5], delay_gain=dev[5], initial_state=dev[6], chunk_size=64, **kw)
        g = torch.autograd.grad((y.double() * w.to(device)).sum() + s.double().sum(), dev)
    assert y.dtype == dtype and s.dtype == torch.float32 and y.device.type == device

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach().double().cpu() - b.detach()).norm() / b.detach().norm())

    assert rel(y, y_ref) < tol and rel(s, s_ref) < tol
    for name, a, b in zip(("x", "k", "q", "log_decay", "beta", "gain", "S0"), g, g_ref, strict=True):
        assert rel(a, b) < 10 * tol, name


# Packed documents (seq_idx): each document is scanned as if alone.

# Document lengths per row; rows of one case sum to the same T.
LAYOUTS = {
    "one": [[23], [23]],
    "chunk-aligned": [[8, 8, 7], [16, 7]],
    "single-tokens": [[1, 1, 5, 1, 15], [3, 1, 1, 1, 17]],
    "starts-late": [[20, 3], [22, 1]],
    "shorter-than-tau": [[1, 1], [2]],  # T = 2: with tau 3 and 5, past states before the sequence
}


def seq_idx_for(lengths: list[list[int]], offset: int = 3) -> torch.Tensor:
    """(B, T) document indices, starting from an arbitrary index per row."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)) + offset * b, torch.tensor(row))
                        for b, row in enumerate(lengths)])


def scan_alone(fn, inputs, lengths, S0, past0, **kw):
    """Each row's documents scanned one by one: the first from the initial states, the rest from zeros."""
    x, k, q, ld, beta = inputs
    ys, finals, pasts = [], [], []
    for b, row in enumerate(lengths):
        start, y_row = 0, []
        for i, n in enumerate(row):
            span = slice(start, start + n)
            first = i == 0
            y, s, past = fn(x[b:b + 1, span], k[b:b + 1, span], q[b:b + 1, span], ld[b:b + 1, span],
                            beta[b:b + 1, span], return_past_states=True,
                            initial_state=S0[b:b + 1] if first and S0 is not None else None,
                            initial_past_states=past0[b:b + 1] if first and past0 is not None else None, **kw)
            y_row.append(y)
            start += n
        ys.append(torch.cat(y_row, 1))
        finals.append(s)
        pasts.append(past)
    return torch.cat(ys), torch.cat(finals), torch.cat(pasts)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
@pytest.mark.parametrize("tau,init", [(0, False), (2, True), (5, False), (3, True), (4, True)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_equals_each_document_alone_fp64(layout, tau, init, delta_rule):
    lengths = LAYOUTS[layout]
    T = sum(lengths[0])
    x, k, q, ld, beta, gain, S0 = make_inputs(T=T, G=2)
    S0 = S0 if init else None
    past0 = torch.randn(2, tau, 4, 5, 6, dtype=torch.float64) if init else None
    kw = dict(delta_rule=delta_rule, tau=tau, delay_gain=gain if tau else None)
    alone = scan_alone(conba_scan_reference, (x, k, q, ld, beta), lengths, S0, past0, **kw)
    seq_idx = seq_idx_for(lengths)
    packed = dict(initial_state=S0, initial_past_states=past0, seq_idx=seq_idx, return_past_states=True, **kw)
    ref = conba_scan_reference(x, k, q, ld, beta, **packed)
    for chunk in (4, 8, 64):
        got = conba_scan(x, k, q, ld, beta, chunk_size=chunk, **packed)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for a, b in zip(ref, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_one_document_index_everywhere_changes_nothing():
    x, k, q, ld, beta, gain, S0 = make_inputs(T=21, G=2)
    kw = dict(delta_rule=True, tau=2, delay_gain=gain, initial_state=S0, chunk_size=8)
    plain = conba_scan(x, k, q, ld, beta, **kw)
    same = conba_scan(x, k, q, ld, beta, seq_idx=torch.full((2, 21), 7), **kw)
    for a, b in zip(plain, same, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
def test_packed_gradients_match_reference_fp64(delta_rule):
    inputs = [t.requires_grad_() for t in make_inputs(T=19, G=2)]
    x, k, q, ld, beta, gain, S0 = inputs
    seq_idx = seq_idx_for([[5, 1, 13], [8, 8, 3]])
    kw = dict(delta_rule=delta_rule, tau=2, delay_gain=gain, initial_state=S0, seq_idx=seq_idx)
    w = torch.randn(2, 19, 4, 5, dtype=torch.float64)
    grads = []
    for fn, extra in ((conba_scan_reference, {}), (conba_scan, {"chunk_size": 8})):
        y, s = fn(x, k, q, ld, beta, **kw, **extra)
        grads.append(torch.autograd.grad((y * w).sum() + s.square().sum(), inputs))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("fn", [conba_scan, conba_scan_reference], ids=["chunked", "reference"])
def test_bad_seq_idx_raises_clear_errors(fn):
    x, k, q, ld, beta, _, _ = make_inputs(T=6, G=2)
    for bad, match in ((torch.zeros(2, 5, dtype=torch.long), r"seq_idx must be \(B, T\)=\(2, 6\)"),
                       (torch.zeros(2, 6), "integer document indices"),
                       (torch.zeros(2, 6, dtype=torch.bool), "integer document indices"),
                       (torch.zeros(2, 6, dtype=torch.complex64), "integer document indices"),
                       (torch.tensor([[0, 0, 1, 1, 0, 0]] * 2), "non-decreasing")):
        with pytest.raises(ValueError, match=match):
            fn(x, k, q, ld, beta, delta_rule=True, seq_idx=bad)
    with pytest.raises(ValueError, match="non-decreasing"):  # two steps: the shortest sequence checked
        fn(x[:, :2], k[:, :2], q[:, :2], ld[:, :2], beta[:, :2], delta_rule=True, seq_idx=torch.tensor([[1, 0]] * 2))


def test_packed_scan_compiles_into_one_graph(have_c_compiler):
    if not have_c_compiler:
        pytest.skip("torch.compile needs a C compiler")
    x, k, q, ld, beta, gain, S0 = make_inputs(T=20, G=2, dtype=torch.float32)
    seq_idx = seq_idx_for([[5, 1, 14], [20]])
    kw = dict(delta_rule=True, tau=2, delay_gain=gain, initial_state=S0, seq_idx=seq_idx, chunk_size=8)
    compiled = torch.compile(conba_scan, fullgraph=True, dynamic=False)
    for a, b in zip(compiled(x, k, q, ld, beta, **kw), conba_scan(x, k, q, ld, beta, **kw), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
def test_torch_func_transforms_match_the_reference_fp64(delta_rule):
    """Forward-mode (jvp), reverse-mode Jacobians (jacrev) and vmap go through the chunked scan's autograd.Functions
    as through the reference loop's plain ops."""
    x, k, q, ld, beta, gain, S0 = make_inputs(B=1, T=9, H=2, P=2, G=1, N=3)
    kw = dict(delta_rule=delta_rule, tau=2, delay_gain=gain[:2], initial_state=S0[:, :2, :2, :3])
    x, S0 = x[..., :2, :2], kw["initial_state"]
    ld, beta = ld[..., :2], beta[..., :2]
    k, q = k[..., :3], q[..., :3]
    dirs = [torch.randn_like(t) for t in (x, ld, beta)]
    results = []
    for fn, extra in ((conba_scan_reference, {}), (conba_scan, {"chunk_size": 4})):
        def f(x_, ld_, beta_, fn=fn, extra=extra):
            return fn(x_, k, q, ld_, beta_, **kw, **extra)[0]
        _, tangent = torch.func.jvp(f, (x, ld, beta), tuple(dirs))
        jac = torch.func.jacrev(f, argnums=(1, 2))(x, ld, beta)
        batched = torch.func.vmap(lambda ld_: f(x, ld_, beta))(torch.stack([ld, 2 * ld]))
        results.append((tangent, *jac, batched))
    for got, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_dynamo_traces_the_scan_with_gradients_in_one_graph():
    """The scan's autograd.Functions with a `jvp` would break a compiled graph (dynamo does not trace those): inside
    one, the plain Functions run."""
    x, k, q, ld, beta, gain, _ = (t.float() for t in make_inputs(T=20))
    x.requires_grad_(), ld.requires_grad_()
    explained = torch._dynamo.explain(lambda x_, ld_: conba_scan(
        x_, k, q, ld_, beta, delta_rule=True, tau=2, delay_gain=gain, chunk_size=8)[0].sum())(x, ld)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_initial_states_of_another_dtype_are_taken_in_the_inputs_dtype():
    """A cache kept in another dtype than the inputs: initial_state (fp64 or bf16) and initial_past_states (bf16)
    are cast to the inputs' dtype, so that the delayed readout does not run in bf16 and the state stays fp32."""
    x, k, q, log_decay, beta, gain, S0 = make_inputs(T=10, dtype=torch.float32)
    past0 = initial_past_states(S0, 3).bfloat16()
    for s0 in (S0.double(), S0.bfloat16()):
        kwargs = dict(delta_rule=True, tau=3, delay_gain=gain, initial_state=s0, initial_past_states=past0,
                      return_past_states=True)
        got = conba_scan(x, k, q, log_decay, beta, chunk_size=4, **kwargs)
        want = conba_scan_reference(x, k, q, log_decay, beta, **kwargs)
        assert [t.dtype for t in got] == [torch.float32] * 3
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
