"""Input checks shared by the implementations of the Conba scan contract."""

from __future__ import annotations

import torch


def check_scan_inputs(
    x: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    log_decay: torch.Tensor,
    beta: torch.Tensor,
    tau: int,
    delay_gain: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    initial_past_states: torch.Tensor | None,
) -> tuple[int, int, int, int, int, int]:
    """Validate (B,T,H,P) / (B,T,G,N) / (B,T,H) shapes; return (B, T, H, P, G, N)."""
    if x.dim() != 4:
        raise ValueError(f"conba_scan: x must be (B, T, H, P), got shape {tuple(x.shape)}")
    B, T, H, P = x.shape
    if k.dim() != 4 or k.shape[:2] != (B, T) or k.shape != q.shape:
        raise ValueError(f"conba_scan: k and q must both be (B={B}, T={T}, G, N), got {tuple(k.shape)} "
                         f"and {tuple(q.shape)}")
    G, N = k.shape[2:]
    if H % G != 0:
        raise ValueError(f"conba_scan: the number of key groups G={G} must divide the number of heads H={H}")
    for name, t in (("log_decay", log_decay), ("beta", beta)):
        if t.shape != (B, T, H):
            raise ValueError(f"conba_scan: {name} must be (B, T, H)={(B, T, H)}, got {tuple(t.shape)}")
    if tau < 0:
        raise ValueError(f"conba_scan: tau={tau} must be >= 0")
    if tau > 0 and (delay_gain is None or delay_gain.shape != (H,)):
        raise ValueError(f"conba_scan: tau={tau} > 0 needs delay_gain of shape (H,)=({H},)")
    if initial_state is not None and initial_state.shape != (B, H, P, N):
        raise ValueError(f"conba_scan: initial_state must be (B, H, P, N)={(B, H, P, N)}, "
                         f"got {tuple(initial_state.shape)}")
    if initial_past_states is not None and initial_past_states.shape != (B, tau, H, P, N):
        raise ValueError(f"conba_scan: initial_past_states must be (B, tau, H, P, N)={(B, tau, H, P, N)}, "
                         f"got {tuple(initial_past_states.shape)}")
    return B, T, H, P, G, N


def triton_chunk_ok(chunk_size: int, tau: int) -> bool:
    """Whether the Triton kernel takes this chunk size: a power of two >= 16 and >= tau."""
    return chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0 and chunk_size >= tau
