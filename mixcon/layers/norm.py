"""RMSNorm, plain and gated (Mamba-2's norm of o ⊙ SiLU(z), per key group)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixcon.ops.dtypes import compute_dtype
from mixcon.ops.norm import rms_norm


class RMSNorm(nn.Module):
    """x / RMS(x) · weight over the last dim (`mixcon.ops.rms_norm`: `F.rms_norm`, or its CPU form)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """RMSNorm(o ⊙ SiLU(z)), normalised over `groups` equal slices of the last dimension: computed in fp32 (at least),
    rounded to z's dtype, then scaled by the weight (as transformers' Mamba-2 norm)."""

    def __init__(self, dim: int, groups: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        if groups < 1 or dim % groups:
            raise ValueError(f"GatedRMSNorm: groups={groups} must be >= 1 and divide dim={dim}")
        self.eps = eps
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        f32 = compute_dtype(z)
        h = o.to(f32) * F.silu(z.to(f32))
        h = h.unflatten(-1, (self.groups, -1))
        h = F.rms_norm(h, (h.shape[-1],), eps=self.eps).flatten(-2)
        return self.weight * h.to(z.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, groups={self.groups}, eps={self.eps}"
