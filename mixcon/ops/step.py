"""Single-token step of the Conba scan contract (DESIGN.md §2.1): decoding, O(P·N) per head."""

from __future__ import annotations

import torch


def conba_scan_step(
    x: torch.Tensor,  # (B, H, P)
    k: torch.Tensor,  # (B, G, N)
    q: torch.Tensor,  # (B, G, N)
    log_decay: torch.Tensor,  # (B, H)
    beta: torch.Tensor,  # (B, H)
    state: torch.Tensor,  # (B, H, P, N): S_{t-1}
    *,
    delta_rule: bool,
    delay_gain: torch.Tensor | None = None,  # (H,)
    delayed_state: torch.Tensor | None = None,  # (B, H, P, N): S_{t-tau}, when tau > 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence; returns (y (B, H, P), S_t (B, H, P, N))."""
    B, H, P = x.shape
    G, N = k.shape[1:]
    if state.shape != (B, H, P, N):
        raise ValueError(f"conba_scan_step: state must be {(B, H, P, N)}, got {tuple(state.shape)}")
    if (delay_gain is None) != (delayed_state is None):
        raise ValueError("conba_scan_step: delay_gain and delayed_state go together")
    dt = state.dtype
    hg = H // G
    # View heads as (G, H/G) so that keys and queries broadcast without copies.
    S = state.view(B, G, hg, P, N)
    xg = x.to(dt).view(B, G, hg, P)
    kg = k.to(dt).view(B, G, 1, N)
    qg = q.to(dt).view(B, G, 1, N)
    decay = log_decay.to(dt).exp().view(B, G, hg, 1, 1)
    b = beta.to(dt).view(B, G, hg, 1)
    Sbar = decay * S
    write = xg - (Sbar @ kg.unsqueeze(-1)).squeeze(-1) if delta_rule else xg  # (B, G, hg, P)
    S_new = Sbar + (b * write).unsqueeze(-1) * kg.unsqueeze(-2)  # (B, G, hg, P, N)
    y = (S_new @ qg.unsqueeze(-1)).squeeze(-1)  # (B, G, hg, P)
    if delayed_state is not None:
        delayed = (delayed_state.view(B, G, hg, P, N) @ qg.unsqueeze(-1)).squeeze(-1)
        y = y + delay_gain.to(dt).view(1, G, hg, 1) * delayed
    return y.reshape(B, H, P).to(x.dtype), S_new.reshape(B, H, P, N)
