"""Dense SwiGLU feed-forward: W_down (SiLU(W_gate h) ⊙ W_up h)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixcon.layers.linear import Linear


class SwiGLU(nn.Module):
    """W_down (SiLU(W_gate h) ⊙ W_up h), the gate and up projections as one product: (..., d_model) -> (..., d_out)."""

    def __init__(self, d_model: int, hidden: int, d_out: int | None = None) -> None:
        super().__init__()
        self.gate_up = Linear(d_model, 2 * hidden, bias=False)
        self.down = Linear(hidden, d_out or d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
