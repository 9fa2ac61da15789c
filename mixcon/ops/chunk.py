"""Chunked Conba scan (DESIGN.md §2.1): matrix products within chunks, a short pass across them.

Within a chunk starting from state S0, with cumulative log decay b_t, every state is
    S_t = exp(b_t) S0 + sum_{s<=t} exp(b_t - b_s) u_s k_s^T
where u_s = beta_s x_s (open loop, SSD) or, for the delta rule, the solution of the unit lower
triangular system (I + diag(beta) M) U = diag(beta) (X - diag(exp b) K S0^T), M[t, s] =
exp(b_t - b_s) k_t.k_s for s < t (the UT / WY transform of Gated DeltaNet). Writing
U = Ut - W S0^T with Ut, W independent of S0 leaves two small products per chunk for the
sequential pass; everything else is batched over all chunks:
    U  = Ut - W S0^T,   S_C = exp(b_C) S0 + (w U)^T K,   w = exp(b_C - b)
    Y  = A U + diag(exp b) Q S0^T,   A[t, s] = exp(b_t - b_s) q_t.k_s  (s <= t)
The delayed readout S_{t-tau} q_t, for t - tau in t's chunk, is the same readout with the decay rows shifted down
by tau (merged into A and exp(b) of y: no second product); for t - tau in an earlier chunk, the readout of that
chunk's last steps with the queries tau steps later.
Packed documents (`seq_idx`) zero every decay factor exp(b_t - b_s) whose two ends lie in
different documents, and the delayed readout where t - tau lies before its document.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mixcon.ops._jvp import save_for_both, traced
from mixcon.ops.contract import LOG_DECAY_FLOOR, check_scan_inputs, early_delayed_readout, initial_states, no_steps
from mixcon.ops.dtypes import compute_dtype


def _chunks(t: torch.Tensor, T_pad: int, C: int, groups: int) -> torch.Tensor:
    """(B, T, H, *D) -> (B, G, H/G, n_chunks, C, *D), zero-padded along T (heads split into groups)."""
    B, T, H = t.shape[:3]
    if T_pad != T:
        t = F.pad(t, [0, 0] * (t.dim() - 3) + [0, 0, 0, T_pad - T])
    t = t.reshape(B, T_pad // C, C, H, *t.shape[3:]).movedim(3, 1)  # (B, H, nc, C, *D)
    return t.unflatten(1, (groups, H // groups))


def _unchunk(t: torch.Tensor, T: int) -> torch.Tensor:
    """(B, G, H/G, n_chunks, C, D) -> (B, T, H, D)."""
    t = t.flatten(1, 2)
    B, H, nc, C, D = t.shape
    return t.movedim(1, 3).reshape(B, nc * C, H, D)[:, :T]


class _Documents(NamedTuple):
    """Document indices of a chunked sequence, relative to the first token's (0: the document that
    the initial state belongs to), all (B, 1, 1, ...) to broadcast against (B, G, hg, nc, ...)."""

    seg: torch.Tensor  # (B, 1, 1, nc, C): each step's document (padding continues the last)
    start: torch.Tensor  # (B, 1, 1, nc, 1): the document of the state each chunk starts from
    last: torch.Tensor  # (B, 1, 1): the last token's document

    @classmethod
    def build(cls, seq_idx: torch.Tensor, T_pad: int, C: int) -> _Documents:
        B, T = seq_idx.shape
        seg = seq_idx - seq_idx[:, :1]
        seg = torch.cat([seg, seg[:, -1:].expand(B, T_pad - T)], dim=1).view(B, 1, 1, T_pad // C, C)
        start = torch.cat([seg.new_zeros(B, 1, 1, 1), seg[..., :-1, -1]], dim=-1).unsqueeze(-1)
        return cls(seg, start, seg[..., -1, -1])


def _readout(
    Qc: torch.Tensor,  # (B, G, nc, Cq, N) queries, shared by the heads of a group
    Kc: torch.Tensor,  # (B, G, nc, C, N) keys
    decay_mat: torch.Tensor,  # (B, G, hg, nc, Cq, C) decay from each step to each query row, 0 where it cannot read
    eb: torch.Tensor,  # (B, G, hg, nc, Cq) decay from the chunk start to each query row
    U: torch.Tensor,  # (B, G, hg, nc, C, P) what each step writes
    S_starts: torch.Tensor,  # (B, G, nc, hg, P, N) state at each chunk start
) -> torch.Tensor:
    """sum_s decay_mat[t, s] (q_t.k_s) u_s + eb_t S0 q_t for each query row t of each chunk: (B, G, hg, nc, Cq, P)."""
    # One QKᵀ per group, decayed per head.
    A = (Qc @ Kc.transpose(-1, -2)).unsqueeze(2) * decay_mat  # (B, G, hg, nc, Cq, C)
    # The heads of a group share Q: one (Cq, N) x (N, hg·P) product per chunk, scaled by exp(b_t) after.
    inter = torch.einsum("bgcsn,bgchpn->bghcsp", Qc, S_starts)  # (B, G, hg, nc, Cq, P)
    return A @ U + eb.unsqueeze(-1) * inter


class _DecayMatrix(torch.autograd.Function):
    """exp(b_t - b_s) where `keep`, else 0: b (..., C) log decays, lo (..., C) what fp32 rounds off them (no gradient),
    keep (..., C, C) -> (..., C, C). One buffer written in place, and the gradient of b as the row sums minus the
    column sums of grad * D (autograd's chain of broadcasts, where and exp allocated five)."""

    generate_vmap_rule = True  # torch.func: vmap, jacrev (jvp through the subclass)

    @staticmethod
    def forward(b: torch.Tensor, lo: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        D = b.unsqueeze(-1) - b.unsqueeze(-2)
        return D.add_(lo.unsqueeze(-1) - lo.unsqueeze(-2)).masked_fill_(~keep, float("-inf")).exp_()

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (D,) = ctx.saved_tensors
        gD = grad * D
        return gD.sum(-1) - gD.sum(-2), None, None


class _DecayMatrixJvp(_DecayMatrix):
    """The same with forward-mode AD (torch.func.jvp); dynamo does not trace Functions that define `jvp`, so compiled
    code takes the one above (`traced`)."""

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        save_for_both(ctx, output)

    @staticmethod
    def jvp(ctx: torch.autograd.function.FunctionCtx, db: torch.Tensor | None, *_: torch.Tensor | None
            ) -> torch.Tensor:
        (D,) = ctx.saved_tensors
        return D * (db.unsqueeze(-1) - db.unsqueeze(-2)) if db is not None else torch.zeros_like(D)


class _UnitLowerInverse(torch.autograd.Function):
    """(I + L)^-1 of unit lower triangular matrices (..., C, C), by a triangular solve; the gradient by two products,
    -X^T dX X^T below the diagonal (autograd's own is a second solve and a product: ~2x slower on a CPU)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(system: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(system.shape[-1], dtype=system.dtype, device=system.device)
        return torch.linalg.solve_triangular(system, eye.expand_as(system), upper=False, unitriangular=True)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (inv,) = ctx.saved_tensors
        return -(inv.mT @ grad @ inv.mT).tril(-1)


class _UnitLowerInverseJvp(_UnitLowerInverse):
    """The same with forward-mode AD (see `_DecayMatrixJvp`)."""

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        save_for_both(ctx, output)

    @staticmethod
    def jvp(ctx: torch.autograd.function.FunctionCtx, d_system: torch.Tensor) -> torch.Tensor:
        (inv,) = ctx.saved_tensors
        return -(inv @ d_system.tril(-1) @ inv)


def _chunk_writes(U: torch.Tensor, w: torch.Tensor, Kc: torch.Tensor) -> torch.Tensor:
    """sum_s w_s u_s k_sᵀ per chunk: (B, G, hg, nc, C, P), (..., C), (B, G, nc, C, N) -> (B, G, hg, nc, P, N)."""
    return torch.einsum("bghcsp,bgcsn->bghcpn", w.unsqueeze(-1) * U, Kc)


def _decays_to_end(b: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """exp(b_end - b_s) for every step s of a run of steps (the last dim) ending at `end`, from the log decays b
    and what fp32 rounds off them, lo (..., C) -> (..., C)."""
    return ((b[..., -1:] - b) + (lo[..., -1:] - lo)).exp()


def conba_scan(
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
    seq_idx: torch.Tensor | None = None,  # (B, T) document of each token, non-decreasing
) -> tuple[torch.Tensor, ...]:
    """Chunked Conba scan; returns (y (B,T,H,P), final_state (B,H,P,N)[, past_states (B,tau,H,P,N)]).

    `past_states` are the tau most recent states S_{T-tau+1} .. S_T, which the decode cache needs when tau > 0
    (S_j for j <= 0: S_0, or `initial_past_states` S_{1-tau} .. S_0, whose last entry must equal
    `initial_state`; not checked: the decode cache keeps them equal). A token whose `seq_idx`
    differs from the previous token's starts a document from zero states, as if scanned alone. Log decays
    below LOG_DECAY_FLOOR (-100; -inf included) act as that floor: a full reset, to within exp(-100).
    """
    B, T, H, P, G, N = check_scan_inputs(x, k, q, log_decay, beta, tau, delay_gain, initial_state,
                                         initial_past_states, seq_idx, chunk_size)
    out_dtype, dt = x.dtype, compute_dtype(x)
    S0, past0 = initial_states(x, N, tau, initial_state, initial_past_states, dt)
    if T == 0:
        return no_steps(x, S0, past0, out_dtype, return_past_states)

    C = max(1, min(chunk_size, T))
    T_pad = -(-T // C) * C
    hg = H // G
    Xc = _chunks(x.to(dt), T_pad, C, G)  # (B, G, hg, nc, C, P)
    Kc = _chunks(k.to(dt), T_pad, C, G).squeeze(2)  # (B, G, nc, C, N)
    Qc = _chunks(q.to(dt), T_pad, C, G).squeeze(2)
    # Padded steps neither decay nor write: the state passes through them unchanged.
    log_decay_c = _chunks(log_decay.to(dt).clamp(min=LOG_DECAY_FLOOR), T_pad, C, G)  # (B, G, hg, nc, C)
    beta_c = _chunks(beta.to(dt), T_pad, C, G)  # (B, G, hg, nc, C)

    # Log decays from the chunk start, b, with what fp32 rounds off them, lo (the running sum in fp64): after a
    # strong decay b is large, and b_t - b_s alone would lose the weak decays between s and t.
    b64 = log_decay_c.to(torch.float64).cumsum(-1)  # (B, G, hg, nc, C)
    b = b64.to(dt)
    lo = (b64 - b.to(torch.float64)).to(dt).detach()  # its gradient is zero (d b64 - d b): not computed
    eb = b.exp()
    causal = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
    w = _decays_to_end(b, lo)  # (B, G, hg, nc, C): decay from each step to the chunk end
    eb_C = b[..., -1:].exp()  # (B, G, hg, nc, 1): decay across the whole chunk
    docs = _Documents.build(seq_idx, T_pad, C) if seq_idx is not None else None
    if docs is not None:  # no decay path crosses a document start
        causal = causal & (docs.seg.unsqueeze(-1) == docs.seg.unsqueeze(-2))
        eb = eb * (docs.seg == docs.start)
        w = w * (docs.seg == docs.seg[..., -1:])
        eb_C = eb_C * (docs.seg[..., -1:] == docs.start)
    decay_mat = traced(_DecayMatrix, _DecayMatrixJvp).apply(b, lo, causal)  # (..., C, C): exp(b_t - b_s), 0 above

    decays = eb_C.unsqueeze(-1).unbind(3)  # nc × (B, G, hg, 1, 1)
    S = S0.view(B, G, hg, P, N)
    chunk_starts = []
    # The sequential pass over chunks; tensors are unbound once, since indexing inside the loop
    # would make autograd build a full-size gradient per chunk.
    if delta_rule:
        # The strictly lower triangle masked on the groups' K Kᵀ, before it is decayed per head.
        strict = (Kc @ Kc.transpose(-1, -2)).tril(-1).unsqueeze(2) * decay_mat  # (B, G, hg, nc, C, C)
        eye = torch.eye(C, dtype=dt, device=x.device)
        system = torch.addcmul(eye, beta_c.unsqueeze(-1), strict)  # I + diag(beta) M: (B, G, hg, nc, C, C)
        # One triangular solve for the (C, C) inverse, then two batched products: on a CPU that is
        # 2-3x faster than solving for the P + N right-hand sides directly.
        inv = traced(_UnitLowerInverse, _UnitLowerInverseJvp).apply(system)  # (B, G, hg, nc, C, C)
        Ut = inv @ (beta_c.unsqueeze(-1) * Xc)  # (B, G, hg, nc, C, P)
        # W = inv diag(beta exp b) K: the heads of a group share K, one (hg·C, C) x (C, N) product per chunk (each
        # chunk's W then lies in one block for the pass below).
        W = torch.einsum("bghcts,bgcsn->bghctn", inv * (beta_c * eb).unsqueeze(-2), Kc)  # (B, G, hg, nc, C, N)
        writes = []
        for Ut_c, W_c, w_c, K_c, eb_C_c in zip(Ut.unbind(3), W.unbind(3), w.unbind(3), Kc.unbind(2), decays,
                                           strict=True):
            chunk_starts.append(S)
            U_c = Ut_c - W_c @ S.transpose(-1, -2)  # (B, G, hg, C, P)
            writes.append(U_c)
            S = eb_C_c * S + torch.einsum("bghsp,bgsn->bghpn", w_c.unsqueeze(-1) * U_c, K_c)
        U = torch.stack(writes, dim=3)
    else:
        U = beta_c.unsqueeze(-1) * Xc
        for D_c, eb_C_c in zip(_chunk_writes(U, w, Kc).unbind(3), decays, strict=True):
            chunk_starts.append(S)
            S = eb_C_c * S + D_c
    S_starts = torch.stack(chunk_starts, dim=2)  # (B, G, nc, hg, P, N): chunk-major, as the readout reads them
    final = S.reshape(B, H, P, N)

    decay_y, eb_y = decay_mat, eb
    if 0 < tau < C:
        # S_{t-tau} q_t for the rows t >= tau of a chunk reads the same chunk: the decay rows shifted down by tau,
        # merged into the readout's (one product for both terms; rows t < tau are zero here).
        shifted, eb_shifted = F.pad(decay_mat[..., : C - tau, :], (0, 0, tau, 0)), F.pad(eb[..., : C - tau], (tau, 0))
        if docs is not None:  # S_{t-tau} is zero when t - tau lies before t's document
            same = (docs.seg == F.pad(docs.seg[..., : C - tau], (tau, 0))).to(dt)  # (B, 1, 1, nc, C)
            shifted, eb_shifted = shifted * same.unsqueeze(-1), eb_shifted * same
        g_h = delay_gain.to(dt).view(1, G, hg, 1, 1)
        decay_y, eb_y = decay_mat + g_h.unsqueeze(-1) * shifted, eb + g_h * eb_shifted
    if tau == 0:
        y = _unchunk(_readout(Qc, Kc, decay_y, eb_y, U, S_starts), T)  # (B, T, H, P)
    else:
        # The rows whose S_{t-tau} lies in an earlier chunk: the last m steps of each chunk, read out with the queries
        # tau steps later as m more query rows of that chunk, then moved forward by tau.
        m = min(tau, C)
        q_later = F.pad(q.to(dt), [0, 0, 0, 0, 0, tau])[:, tau:]  # (B, T, G, N): q_{t+tau}, zeros past the end
        Q2c = _chunks(q_later, T_pad, C, G).squeeze(2)[..., C - m :, :]  # (B, G, nc, m, N)
        rows = _readout(torch.cat([Qc, Q2c], dim=-2), Kc, torch.cat([decay_y, decay_mat[..., C - m :, :]], dim=-2),
                        torch.cat([eb_y, eb[..., C - m :]], dim=-1), U, S_starts)  # (B, G, hg, nc, C + m, P)
        early = early_delayed_readout(q, past0, hg)  # the first tau steps read the initial past states
        gain = delay_gain.to(dt)
        same = None  # (B, T_pad): 0 where S_{t-tau} is zero, t - tau lying before t's document
        if docs is not None:
            seg = docs.seg.reshape(B, T_pad)
            same = (seg == F.pad(seg, (tau, 0))[:, :T_pad]).to(dt)
        # rows taken apart by split, whose gradient is one concatenation (each slice's would fill a zero tensor of
        # rows' size, and pad and cat in the sequence layout added four more passes over it).
        if tau <= C:  # the first tau rows of chunk c + 1 read chunk c's `later` rows: added in the chunked layout
            head, body, later = rows.split([tau, C - tau, m], dim=-2)
            delayed = torch.cat([_chunks(early, tau, tau, G), later[:, :, :, :-1]], dim=3)  # (B, G, hg, nc, tau, P)
            if same is not None:
                delayed = delayed * same.view(B, 1, 1, -1, C)[..., :tau, None]
            # concatenated in the sequence layout: one copy (in the chunked one, a second to move the heads)
            pieces = [t.flatten(1, 2).movedim(1, 3) for t in (head + gain.view(G, hg, 1, 1, 1) * delayed, body)]
            y = torch.cat(pieces, dim=2).reshape(B, T_pad, H, P)[:, :T]  # (B, nc, C, H, P) -> (B, T, H, P)
        else:  # tau steps back lies chunks back (m = C): moved forward in the sequence layout
            main, later = rows.split([C, m], dim=-2)
            delayed = torch.cat([early, _unchunk(later, T)[:, : T - early.shape[1]]], dim=1)  # (B, T, H, P)
            if same is not None:
                delayed = delayed * same[:, :T, None, None]
            y = _unchunk(main, T) + gain[:, None] * delayed
    y = y.to(out_dtype).contiguous()  # (B, T, H, P) in that order, as the reference's
    if not return_past_states:
        return y, final
    return y, final, _past_states(final, past0, S_starts, U, Kc, b, lo, T, tau, C, docs)


def _past_states(
    final: torch.Tensor,  # (B, H, P, N)
    past0: torch.Tensor,  # (B, tau, H, P, N)
    S_starts: torch.Tensor,  # (B, G, nc, hg, P, N)
    U: torch.Tensor,  # (B, G, hg, nc, C, P)
    Kc: torch.Tensor,  # (B, G, nc, C, N)
    b: torch.Tensor,  # (B, G, hg, nc, C) log decays from each chunk start
    lo: torch.Tensor,  # (B, G, hg, nc, C) what fp32 rounds off b
    T: int,
    tau: int,
    C: int,
    docs: _Documents | None,
) -> torch.Tensor:
    """S_{T-tau+1} .. S_T as (B, tau, H, P, N), from the chunk-start states; with `docs`, states
    before the last token's document are zero (that document's S_j for j <= 0)."""
    if tau == 0:
        return past0
    out = []
    for p in range(T - tau + 1, T + 1):  # 1-indexed step
        if p == T:
            out.append(final)
            continue
        if p <= 0:
            S = past0[:, p + tau - 1]
            seg = torch.zeros_like(docs.last) if docs is not None else None
        else:
            c, m = (p - 1) // C, (p - 1) % C  # chunk and last position inside it
            w = _decays_to_end(b[:, :, :, c:c + 1, : m + 1], lo[:, :, :, c:c + 1, : m + 1])  # (B, G, hg, 1, m+1)
            eb_m = b[:, :, :, c, m, None, None].exp()  # (B, G, hg, 1, 1): decay from the chunk start to m
            if docs is not None:
                segs = docs.seg[..., c, : m + 1]  # (B, 1, 1, m+1)
                seg = segs[..., -1]
                w = w * (segs == seg[..., None]).unsqueeze(-2)
                eb_m = eb_m * (seg == docs.start[..., c, 0])[..., None, None]
            writes = _chunk_writes(U[:, :, :, c:c + 1, : m + 1], w, Kc[:, :, c:c + 1, : m + 1]).squeeze(3)
            S = eb_m * S_starts[:, :, c] + writes
            S = S.reshape(final.shape)
        if docs is not None:
            S = S * (seg == docs.last).view(-1, 1, 1, 1).to(S.dtype)
        out.append(S)
    return torch.stack(out, dim=1)
