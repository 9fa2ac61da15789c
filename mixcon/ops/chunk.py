"""Chunked Conba scan (DESIGN.md §2.1): matrix products within chunks, a short pass across them.

Within a chunk starting from state S0, with cumulative log decay b_t, every state is
    S_t = exp(b_t) S0 + sum_{s<=t} exp(b_t - b_s) u_s k_s^T
where u_s = beta_s x_s (open loop, SSD) or, for the delta rule, the solution of the unit lower
triangular system (I + diag(beta) M) U = diag(beta) (X - diag(exp b) K S0^T), M[t, s] =
exp(b_t - b_s) k_t.k_s for s < t (the UT / WY transform of Gated DeltaNet). Writing
U = Ut - W S0^T with Ut, W independent of S0 puts all heavy work outside the sequential loop:
    Y  = (A Ut) + (exp(b) Q - A W) S0^T,      A[t, s] = exp(b_t - b_s) q_t.k_s  (s <= t)
    S_C = S0 (exp(b_C) I - W^T Kd) + Ut^T Kd,  Kd = exp(b_C - b) K
so that the pass over chunks is one (P x N)(N x N) product per chunk (a scalar decay without
the delta rule). The delayed readout S_{t-tau} q_t is the same readout with queries shifted by tau.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixcon.ops._validate import check_scan_inputs
from mixcon.ops.dtypes import compute_dtype


def _chunks(t: torch.Tensor, T_pad: int, C: int) -> torch.Tensor:
    """(B, T, H, *D) -> (B, H, n_chunks, C, *D), zero-padded along T."""
    B, T, H = t.shape[:3]
    if T_pad != T:
        t = F.pad(t, [0, 0] * (t.dim() - 3) + [0, 0, 0, T_pad - T])
    t = t.reshape(B, T_pad // C, C, H, *t.shape[3:])
    return t.movedim(3, 1)


def _unchunk(t: torch.Tensor, T: int) -> torch.Tensor:
    """(B, H, n_chunks, C, D) -> (B, T, H, D)."""
    B, H, nc, C, D = t.shape
    return t.movedim(1, 3).reshape(B, nc * C, H, D)[:, :T]


def _readout(
    Qc: torch.Tensor,  # (B, H, nc, C, N) queries
    Kc: torch.Tensor,  # (B, H, nc, C, N) keys
    decay_mat: torch.Tensor,  # (B, H, nc, C, C) exp(b_t - b_s), 0 above the diagonal
    eb: torch.Tensor,  # (B, H, nc, C) exp(b_t)
    Ut: torch.Tensor,  # (B, H, nc, C, P)
    W: torch.Tensor | None,  # (B, H, nc, C, N)
    starts: torch.Tensor,  # (B, H, nc, P, N) state at each chunk start
) -> torch.Tensor:
    """y_t = S_t q_t for every t, from chunk-start states: (B, H, nc, C, P)."""
    A = (Qc @ Kc.transpose(-1, -2)) * decay_mat
    Q_eff = eb.unsqueeze(-1) * Qc
    if W is not None:
        Q_eff = Q_eff - A @ W
    return A @ Ut + Q_eff @ starts.transpose(-1, -2)


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
) -> tuple[torch.Tensor, ...]:
    """Chunked Conba scan; returns (y (B,T,H,P), final_state (B,H,P,N)[, past_states (B,tau,H,P,N)]).

    `past_states` are the tau most recent states S_{T-tau+1} .. S_T (S_j = S_0 for j <= 0, or taken
    from `initial_past_states`), which the decode cache needs when tau > 0.
    """
    B, T, H, P, G, N = check_scan_inputs(x, k, q, log_decay, beta, tau, delay_gain, initial_state,
                                         initial_past_states)
    out_dtype, dt = x.dtype, compute_dtype(x)
    S0 = x.new_zeros(B, H, P, N, dtype=dt) if initial_state is None else initial_state.to(dt)
    if initial_past_states is None:
        past0 = S0.unsqueeze(1).expand(B, tau, H, P, N)
    else:
        past0 = initial_past_states.to(dt)
    if T == 0:
        y = x.new_zeros(B, 0, H, P, dtype=out_dtype)
        return (y, S0, past0) if return_past_states else (y, S0)

    C = max(1, min(chunk_size, T))
    T_pad = -(-T // C) * C
    nc = T_pad // C
    if G != H:  # heads share keys/queries within a group
        k = k.repeat_interleave(H // G, dim=2)
        q = q.repeat_interleave(H // G, dim=2)
    Xc = _chunks(x.to(dt), T_pad, C)  # (B, H, nc, C, P)
    Kc = _chunks(k.to(dt), T_pad, C)  # (B, H, nc, C, N)
    Qc = _chunks(q.to(dt), T_pad, C)
    ld = _chunks(log_decay.to(dt), T_pad, C)  # (B, H, nc, C); padding: no decay...
    bt = _chunks(beta.to(dt), T_pad, C)  # ... and no write, so the state passes through unchanged

    b = ld.cumsum(-1)  # (B, H, nc, C)
    eb = b.exp()
    causal = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
    diff = b.unsqueeze(-1) - b.unsqueeze(-2)  # (B, H, nc, C, C): b_t - b_s
    decay_mat = torch.where(causal, diff, float("-inf")).exp()
    b_last = b[..., -1:]  # (B, H, nc, 1)
    Kd = (b_last - b).exp().unsqueeze(-1) * Kc  # (B, H, nc, C, N)

    if delta_rule:
        strict = (Kc @ Kc.transpose(-1, -2)) * decay_mat.tril(-1)
        system = torch.eye(C, dtype=dt, device=x.device) + bt.unsqueeze(-1) * strict
        rhs = torch.cat([bt.unsqueeze(-1) * Xc, (bt * eb).unsqueeze(-1) * Kc], dim=-1)
        sol = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        Ut, W = sol.split([P, N], dim=-1)  # (B, H, nc, C, P), (B, H, nc, C, N)
        transition = torch.diag_embed(b_last.exp().expand(B, H, nc, N)) - W.transpose(-1, -2) @ Kd
    else:
        Ut, W = bt.unsqueeze(-1) * Xc, None
        transition = b_last.exp().unsqueeze(-1)  # (B, H, nc, 1, 1): a scalar decay per chunk
    D = Ut.transpose(-1, -2) @ Kd  # (B, H, nc, P, N)

    # Sequential pass over chunk states.
    # unbind once: indexing inside the loop would make autograd build a full-size gradient per chunk.
    S = S0
    starts = []
    for M_c, D_c in zip(transition.unbind(2), D.unbind(2), strict=True):
        starts.append(S)
        S = (S @ M_c if delta_rule else S * M_c) + D_c
    starts_t = torch.stack(starts, dim=2)  # (B, H, nc, P, N)

    y = _unchunk(_readout(Qc, Kc, decay_mat, eb, Ut, W, starts_t), T)  # (B, T, H, P)
    if tau > 0:
        # S_{t-tau} q_t: the readout at step t - tau with queries shifted forward by tau.
        Q2c = _chunks(F.pad(q.to(dt), [0, 0, 0, 0, 0, tau])[:, tau:], T_pad, C)
        r = _unchunk(_readout(Q2c, Kc, decay_mat, eb, Ut, W, starts_t), T)
        head = min(tau, T)  # the first tau steps read the initial past states
        early = torch.einsum("bthpn,bthn->bthp", past0[:, :head], q[:, :head].to(dt))
        delayed = torch.cat([early, r[:, : T - head]], dim=1)
        y = y + delay_gain.to(dt)[:, None] * delayed
    y = y.to(out_dtype)
    if not return_past_states:
        return y, S
    return y, S, _past_states(S, past0, starts_t, Ut, W, Kc, b, T, tau, C)


def _past_states(
    final: torch.Tensor,
    past0: torch.Tensor,
    starts: torch.Tensor,
    Ut: torch.Tensor,
    W: torch.Tensor | None,
    Kc: torch.Tensor,
    b: torch.Tensor,
    T: int,
    tau: int,
    C: int,
) -> torch.Tensor:
    """S_{T-tau+1} .. S_T as (B, tau, H, P, N), from the chunk-start states."""
    if tau == 0:
        return past0
    out = []
    for p in range(T - tau + 1, T + 1):  # 1-indexed step
        if p <= 0:
            out.append(past0[:, p + tau - 1])
        elif p == T:
            out.append(final)
        else:
            c, m = (p - 1) // C, (p - 1) % C  # chunk and last position inside it
            S0 = starts[:, :, c]  # (B, H, P, N)
            U = Ut[:, :, c, : m + 1]
            if W is not None:
                U = U - W[:, :, c, : m + 1] @ S0.transpose(-1, -2)
            bc = b[:, :, c, : m + 1]  # (B, H, m+1)
            w = (bc[..., -1:] - bc).exp().unsqueeze(-1)  # (B, H, m+1, 1)
            out.append(bc[..., -1, None, None].exp() * S0 + U.transpose(-1, -2) @ (w * Kc[:, :, c, : m + 1]))
    return torch.stack(out, dim=1)
