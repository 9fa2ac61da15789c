"""The chunked Conba scan (DESIGN.md §2.1) as one Triton kernel, forward only (inference and prefill).

One program per (batch, head, block of value columns) walks the sequence in chunks of C steps
(`kernel_block`: the model's chunk, at most 32 steps unless tau needs more) with its rows of the
state S (P, N) in registers (each column of x, y and row of S is a scan of its own); within a chunk everything is
(C, C) / (C, P) / (C, N) tile products, as in `ops/chunk.py`:
    open loop:  U = diag(beta) X
    delta rule: (I + diag(beta) M) U = diag(beta) (X - diag(exp b) K Sᵀ), solved by forward
                substitution over the C rows (M[t, s] = exp(b_t - b_s) k_t.k_s, s < t)
    Y = (Q Kᵀ ∘ L) U + diag(exp b) Q Sᵀ,   S <- exp(b_C) S + (w ∘ U)ᵀ K
The delayed readout S_{t-tau} q_t is the same readout with the decays of step t - tau: from this
chunk's start state and writes, or, for its first tau - 1 rows, from the previous chunk's, read out
while that chunk is at hand (with these rows' queries loaded one chunk early) and carried over as one
(C, P) tile. The first tau rows of the sequence read `initial_past_states`; that term is added here,
outside the kernel. The decays are exp of differences of running sums b of the log decays, each carried as
fp32 b plus what fp32 rounds off it, lo (a running sum in fp64, split), as in `ops/chunk.py`: weak decays after
strong ones keep fp32's precision (where plain fp32 differences, as mamba_ssm's and flash-linear-attention's
kernels take, lost up to ~1e-3: docs/benchmarks.md §25).
Needs `triton`; runs on CUDA tensors, and on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from mixcon.ops._jvp import carries_tangents
from mixcon.ops.contract import (
    LOG_DECAY_FLOOR,
    check_scan_inputs,
    early_delayed_readout,
    initial_states,
    no_steps,
    triton_chunk_ok,
)

# Steps per block of the kernel's walk over time, whatever the model's chunk: with 64-step tiles the
# kernel as Triton 3.9 compiles it for sm_80 / sm_90 spills registers (`mixcon bench kernel`).
BLOCK = 32
# Value columns (of P) per program: the scan is independent per column of x, so programs split P. 16
# columns spill the fewest registers on sm_90 (docs/benchmarks.md §17) and give P / 16 times the programs.
VALUE_BLOCK = 16


def kernel_block(chunk_size: int, tau: int) -> int:
    """Steps per block: the chunk, at most BLOCK unless tau needs more (a block holds >= tau steps)."""
    return min(chunk_size, max(BLOCK, triton.next_power_of_2(tau)))


def value_columns(P: int, value_block: int = VALUE_BLOCK) -> int:
    """Value columns per program for heads of P: `value_block`, or fewer when one tile (P to a power of two,
    at least 16) holds them all."""
    return min(value_block, max(16, triton.next_power_of_2(P)))


def launch_options(dtype: torch.dtype, P: int, N: int, block: int, value_block: int = VALUE_BLOCK
                   ) -> dict[str, Any]:
    """The kernel's constexprs and compile options for x, k, q in `dtype`: tiles (BP value columns per
    program, at most `value_block`), and the products' precision — TF32 unless the inputs are fp32 and
    `torch.get_float32_matmul_precision()` is "highest" (the default)."""
    exact = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return dict(C=block, BP=value_columns(P, value_block),
                BN=max(16, triton.next_power_of_2(N)),
                PREC="ieee" if exact else "tf32",
                num_warps=8,  # a dozen (C, 64)-sized fp32 tiles are live at once; 4 warps spill more
                enable_fp_fusion=True)  # fused multiply-adds, stated: Triton 3.10 changes the default


@triton.jit
def _gaps(b_row, lo_row, b_col, lo_col):
    """b_row_t - b_col_s for every (t, s), each b carried with what fp32 rounds off it (lo): (C, C)."""
    return (b_row[:, None] - b_col[None, :]) + (lo_row[:, None] - lo_col[None, :])


@triton.jit
def _readout(Q, K, U, S, b_row, lo_row, b_col, lo_col, limit, cols, prec: tl.constexpr):
    """sum_{s <= limit_t} exp(b_row_t - b_col_s) (q_t.k_s) u_s + exp(b_row_t) S q_t, for every row t."""
    L = tl.exp(tl.where(cols[None, :] <= limit[:, None], _gaps(b_row, lo_row, b_col, lo_col), float("-inf")))
    A = tl.dot(Q, tl.trans(K), input_precision=prec) * L
    inter = tl.dot(Q, tl.trans(S), input_precision=prec)
    return tl.dot(A, U, input_precision=prec) + tl.exp(b_row)[:, None] * inter


@triton.jit
def _at(v, index, cols, last: tl.constexpr):
    """v[min(index_t, last)] for every row t; 0 where index_t < 0 (the chunk start, where b = lo = 0). The clamp keeps
    the rows that a caller discards finite (the carried readout's rows past tau - 1)."""
    return tl.sum(tl.where(cols[None, :] == tl.minimum(index, last)[:, None], v[None, :], 0.0), axis=1)


@triton.jit
def _row(v, rows, i):
    """v[i], a scalar of the (C,) vector v."""
    return tl.sum(tl.where(rows == i, v, 0.0))


@triton.jit
def _state_after(S, U, K, b, lo, rows, i, prec: tl.constexpr):
    """The state after row i of the chunk that starts from S: exp(b_i) S + sum_{s <= i} exp(b_i - b_s) u_s k_sᵀ."""
    b_i = _row(b, rows, i)
    w = tl.exp(tl.where(rows <= i, (b_i - b) + (_row(lo, rows, i) - lo), float("-inf")))
    return tl.exp(b_i) * S + tl.dot(tl.trans(w[:, None] * U), K, input_precision=prec)


@triton.jit
def _conba_scan_kernel(
    x_ptr, k_ptr, q_ptr, ld_ptr, beta_ptr, gain_ptr, s0_ptr, y_ptr, final_ptr, past_ptr,
    T, H, P, N, hpg,
    sxb, sxt, sxh, skb, skt, skg, slb, slt, syb, syt, syh,
    DELTA: tl.constexpr, TAU: tl.constexpr, PAST: tl.constexpr,
    C: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # offsets in int64: B·T·H·P passes 2^31 in long prefills
    h = tl.program_id(1)
    g = h // hpg
    rows = tl.arange(0, C)
    p_idx = tl.program_id(2) * BP + tl.arange(0, BP)  # this program's value columns
    n_idx = tl.arange(0, BN)
    pn_mask = (p_idx[:, None] < P) & (n_idx[None, :] < N)
    state_off = ((pid_b * H + h) * P + p_idx[:, None]) * N + n_idx[None, :]  # into (B, H, P, N)
    S = tl.load(s0_ptr + state_off, mask=pn_mask, other=0.0).to(tl.float32)
    # The delayed readout of the next chunk's first tau - 1 rows, which read states of this one.
    carry = tl.zeros((C, BP), dtype=tl.float32)
    for c0 in range(0, T, C):
        t = (c0 + rows).to(tl.int64)  # (as the time offsets t·H·P of one row may pass 2^31 too)
        live = t < T  # padding rows neither decay nor write
        xm = live[:, None] & (p_idx[None, :] < P)
        km = live[:, None] & (n_idx[None, :] < N)
        X = tl.load(x_ptr + pid_b * sxb + t[:, None] * sxt + h * sxh + p_idx[None, :], mask=xm, other=0.0)
        X = X.to(tl.float32)
        kq_off = pid_b * skb + t[:, None] * skt + g * skg + n_idx[None, :]
        K = tl.load(k_ptr + kq_off, mask=km, other=0.0).to(tl.float32)
        Q = tl.load(q_ptr + kq_off, mask=km, other=0.0).to(tl.float32)
        ld = tl.load(ld_ptr + pid_b * slb + t * slt + h, mask=live, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + pid_b * slb + t * slt + h, mask=live, other=0.0).to(tl.float32)

        b64 = tl.cumsum(ld.to(tl.float64), axis=0)  # (C,) log decay from the chunk start through each row,
        b = b64.to(tl.float32)
        lo = (b64 - b.to(tl.float64)).to(tl.float32)  # with what fp32 rounds off it
        if DELTA:
            KS = tl.dot(K, tl.trans(S), input_precision=PREC)  # (C, BP): S0 k_t
            U = beta[:, None] * (X - tl.exp(b)[:, None] * KS)
            strict = rows[None, :] < rows[:, None]
            decay = tl.exp(tl.where(strict, _gaps(b, lo, b, lo), float("-inf")))
            M = beta[:, None] * tl.dot(K, tl.trans(K), input_precision=PREC) * decay
            for i in range(C):  # forward substitution: row i once the rows above it are final
                m_i = tl.sum(tl.where(rows[:, None] == i, M, 0.0), axis=0)  # (C,) row i of M
                u_i = tl.sum(m_i[:, None] * U, axis=0)  # (BP,)
                U = tl.where(rows[:, None] == i, U - u_i[None, :], U)
        else:
            U = beta[:, None] * X
        Y = _readout(Q, K, U, S, b, lo, b, lo, rows, rows, PREC)
        if TAU > 0:
            # Rows t >= tau - 1 read S_{t - tau} of this chunk (its start state when t = tau - 1) ...
            lim = rows - TAU
            delayed = _readout(Q, K, U, S, _at(b, lim, rows, C - 1), _at(lo, lim, rows, C - 1), b, lo, lim, rows,
                               PREC)
            if TAU > 1:  # ... rows t < tau - 1 a state of the previous chunk, read out there
                delayed = tl.where(rows[:, None] < TAU - 1, carry, delayed)
                # The same for the next chunk's first tau - 1 rows, from this chunk's states.
                t_next = t + C
                m_next = ((rows < TAU - 1) & (t_next < T))[:, None] & (n_idx[None, :] < N)
                Q_next = tl.load(q_ptr + pid_b * skb + t_next[:, None] * skt + g * skg + n_idx[None, :],
                                 mask=m_next, other=0.0).to(tl.float32)
                lim_p = rows + C - TAU
                carry = _readout(Q_next, K, U, S, _at(b, lim_p, rows, C - 1), _at(lo, lim_p, rows, C - 1), b, lo,
                                 lim_p, rows, PREC)
            delayed = tl.where(t[:, None] >= TAU, delayed, 0.0)  # the sequence's first tau rows: outside
            Y += tl.load(gain_ptr + h).to(tl.float32) * delayed
        tl.store(y_ptr + pid_b * syb + t[:, None] * syt + h * syh + p_idx[None, :], Y, mask=xm)
        if PAST:  # the states S_{T-tau+1} .. S_T that fall in this chunk
            for j in range(TAU):
                i = T - TAU + j - c0  # row of state S_{T-tau+1+j} in this chunk
                if (i >= 0) & (i < C):
                    S_i = _state_after(S, U, K, b, lo, rows, i, PREC)
                    past_off = (((pid_b * TAU + j) * H + h) * P + p_idx[:, None]) * N + n_idx[None, :]
                    tl.store(past_ptr + past_off, S_i, mask=pn_mask)
        S = _state_after(S, U, K, b, lo, rows, C - 1, PREC)
    tl.store(final_ptr + state_off, S, mask=pn_mask)


def conba_scan_triton(
    x: torch.Tensor,  # (B, T, H, P) values
    k: torch.Tensor,  # (B, T, G, N) keys
    q: torch.Tensor,  # (B, T, G, N) queries
    log_decay: torch.Tensor,  # (B, T, H), <= 0
    beta: torch.Tensor,  # (B, T, H) write strength
    *,
    delta_rule: bool,
    tau: int = 0,
    delay_gain: torch.Tensor | None = None,  # (H,)
    initial_state: torch.Tensor | None = None,  # (B, H, P, N)
    initial_past_states: torch.Tensor | None = None,  # (B, tau, H, P, N): S_{1-tau} .. S_0
    chunk_size: int = 64,
    return_past_states: bool = False,
    value_block: int = VALUE_BLOCK,
) -> tuple[torch.Tensor, ...]:
    """`conba_scan` in one Triton kernel, without autograd; returns (y, final_state[, past_states]).

    chunk_size must be a power of two >= 16 and >= tau; the kernel walks blocks of `kernel_block` steps, each
    program `value_block` (a power of two >= 16) of the P value columns.
    Products: full fp32 for fp32 inputs unless torch's float32 matmul precision allows TF32, else TF32
    (states and decays are fp32 either way)."""
    B, T, H, P, G, N = check_scan_inputs(x, k, q, log_decay, beta, tau, delay_gain, initial_state,
                                         initial_past_states, chunk_size=chunk_size)
    if not triton_chunk_ok(chunk_size, tau):
        raise ValueError(f"conba_scan_triton: chunk_size={chunk_size} must be a power of two >= 16 and >= tau={tau}")
    if not triton_chunk_ok(value_block, 0):
        raise ValueError(f"conba_scan_triton: value_block={value_block} must be a power of two >= 16")
    if x.dtype == torch.float64:
        raise ValueError("conba_scan_triton: fp64 is not supported; use conba_scan")
    inputs = (x, k, q, log_decay, beta, delay_gain, initial_state, initial_past_states)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise RuntimeError("conba_scan_triton has no backward; use conba_scan for training")
    if carries_tangents(*inputs):
        raise RuntimeError("conba_scan_triton takes no forward-mode AD tangents or torch.func transforms; use "
                           "conba_scan")
    f32 = torch.float32
    log_decay = log_decay.clamp(min=LOG_DECAY_FLOOR)  # as in `conba_scan`
    x, k, q, log_decay, beta = (t.contiguous() for t in (x, k, q, log_decay, beta))
    S0, past0 = initial_states(x, N, tau, initial_state, initial_past_states, f32)
    if T == 0:
        return no_steps(x, S0, past0, x.dtype, return_past_states)
    S0 = S0.contiguous()
    gain = delay_gain.to(f32).contiguous() if tau > 0 else S0  # unread when tau == 0
    y = torch.empty(B, T, H, P, dtype=f32, device=x.device)
    final = torch.empty_like(S0)
    past = x.new_empty(B, tau, H, P, N, dtype=f32)
    options = launch_options(x.dtype, P, N, kernel_block(chunk_size, tau), value_block)
    _conba_scan_kernel[(B, H, triton.cdiv(P, options["BP"]))](
        x, k, q, log_decay, beta, gain, S0, y, final, past,
        T, H, P, N, H // G,
        x.stride(0), x.stride(1), x.stride(2), k.stride(0), k.stride(1), k.stride(2),
        log_decay.stride(0), log_decay.stride(1), y.stride(0), y.stride(1), y.stride(2),
        DELTA=delta_rule, TAU=tau, PAST=return_past_states and tau > 0,
        **options,
    )
    if tau > 0:  # the first tau rows read the initial past states S_{1-tau} .. S_0
        early = early_delayed_readout(q, past0, H // G)
        y[:, : early.shape[1]] += delay_gain.to(f32)[:, None] * early
    y = y.to(x.dtype)
    if not return_past_states:
        return y, final
    if tau > T:  # S_{T-tau+1} .. S_0 are initial past states
        past[:, : tau - T] = past0[:, T:]
    return y, final, past
