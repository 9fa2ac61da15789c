"""Sequential reference of the Conba scan contract (DESIGN.md §2.1): the loop, for tests only."""

from __future__ import annotations

import torch

from mixcon.ops.contract import check_scan_inputs, document_starts
from mixcon.ops.dtypes import compute_dtype


def conba_scan_reference(
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
    chunk_size: int = 64,  # checked as the chunked forms check it, unused: the loop has no chunks
    return_past_states: bool = False,
    seq_idx: torch.Tensor | None = None,  # (B, T) document of each token, non-decreasing
) -> tuple[torch.Tensor, ...]:
    """Token-by-token loop; returns (y, final_state[, past_states]). A token whose `seq_idx` differs
    from the previous token's starts a document: the state and the delayed states are zero before it."""
    B, T, H, P, G, N = check_scan_inputs(x, k, q, log_decay, beta, tau, delay_gain, initial_state,
                                         initial_past_states, seq_idx, chunk_size)
    starts = document_starts(seq_idx) if seq_idx is not None else None
    out_dtype, dt = x.dtype, compute_dtype(x)
    x, log_decay, beta = x.to(dt), log_decay.to(dt), beta.to(dt)
    k = k.to(dt).repeat_interleave(H // G, dim=2)  # (B, T, H, N)
    q = q.to(dt).repeat_interleave(H // G, dim=2)
    S = x.new_zeros(B, H, P, N) if initial_state is None else initial_state.to(dt, copy=True)
    if initial_past_states is not None:
        history = list(initial_past_states.to(dt).unbind(1))  # [S_{t-tau}, ..., S_{t-1}]
    else:
        history = [S] * tau
    ys = []
    for t in range(T):
        if starts is not None:
            keep = (~starts[:, t]).to(dt)[:, None, None, None]  # (B, 1, 1, 1)
            S, history = S * keep, [h * keep for h in history]
        Sbar = log_decay[:, t, :, None, None].exp() * S
        write = x[:, t]  # (B, H, P)
        if delta_rule:
            write = write - torch.einsum("bhpn,bhn->bhp", Sbar, k[:, t])
        S = Sbar + beta[:, t, :, None, None] * torch.einsum("bhp,bhn->bhpn", write, k[:, t])
        y = torch.einsum("bhpn,bhn->bhp", S, q[:, t])
        if tau > 0:
            y = y + delay_gain.to(dt)[:, None] * torch.einsum("bhpn,bhn->bhp", history[0], q[:, t])
            history = [*history[1:], S]
        ys.append(y)
    y = torch.stack(ys, dim=1).to(out_dtype) if T > 0 else x.new_zeros(B, 0, H, P, dtype=out_dtype)
    if return_past_states:
        past = torch.stack(history, dim=1) if tau > 0 else S.new_zeros(B, 0, H, P, N)
        return y, S, past
    return y, S
