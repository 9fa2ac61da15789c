"""RMSNorm, x / RMS(x) · weight over the last dim: `F.rms_norm`, or on a CPU in eager mode a hand-written gradient.

On a CPU, autograd's decomposition of `F.rms_norm` (pow, mean, rsqrt, two products, and their gradients) writes ~10
full-size tensors per forward and backward; this one writes 7: the squared norm in one reduction without a
temporary, and the gradient as gy·w·r - x·(Σ gy·w·x)·r³/d with r = 1/RMS(x) (~3x faster alone on (8, 512, 256);
a `small` training step 1.04-1.06x, docs/benchmarks.md §40). Elsewhere (GPUs, compiled graphs, autocast, other dtypes)
`F.rms_norm` keeps its fused kernels and autocast rule; so do forwards without autograd, whose steps are
dispatch-bound when decoding (an autograd.Function call costs ~55 us more there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x²) + eps) over the last dim: (..., d) -> (..., 1)."""
    return (torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + eps).rsqrt()


def _normalised_jvp(x: torch.Tensor, r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """d(x r) along v, with r = `_rstd(x)` (..., 1): v r - x r³ (x · v) / d."""
    coef = (x * v).sum(-1, keepdim=True) * (r.pow(3) / x.shape[-1])  # (..., 1)
    return torch.addcmul(v * r, x, coef, value=-1)


class _RMSNorm(torch.autograd.Function):
    """x · r · w with r = `_rstd(x)`; the gradients written out (see the module's docstring)."""

    generate_vmap_rule = True  # torch.func: vmap, jacrev

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return x * _rstd(x, eps) * weight

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        d, r = x.shape[-1], _rstd(x, ctx.eps)  # (..., 1): recomputed, one reduction
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:  # Σ over rows of grad · x · r
            grad_w = (grad * x).reshape(-1, d).t() @ r.reshape(-1)
        if ctx.needs_input_grad[0]:
            grad_x = _normalised_jvp(x, r, grad * weight)  # (x r's Jacobian is symmetric)
        return grad_x, grad_w, None

    @staticmethod
    def jvp(ctx: torch.autograd.function.FunctionCtx, dx: torch.Tensor | None, dw: torch.Tensor | None,
            _: None) -> torch.Tensor:
        x, weight = ctx.saved_tensors
        r = _rstd(x, ctx.eps)
        out = torch.zeros_like(x) if dw is None else x * r * dw
        return out if dx is None else out + _normalised_jvp(x, r, dx) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dim: (..., d), (d,) -> (..., d), as `F.rms_norm`."""
    if (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")):
        return _RMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)
