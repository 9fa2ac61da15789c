"""nn.Linear through `mixcon.ops.linear` (same parameters and state dict)."""

from __future__ import annotations

import torch
from torch import nn

from mixcon.ops.linear import linear


class Linear(nn.Linear):
    """nn.Linear whose compiled few-row products (decoding) run as one fused loop on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
