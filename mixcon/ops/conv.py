"""Depthwise causal conv over time in the (B, T, C) layout, with a hand-written gradient.

Written as `width` shifted multiply-adds: no transposes around conv1d, elementwise work that torch.compile fuses.
Autograd's gradient of that sum spends a zero-filled full-size tensor per tap on the shifted slices, and a full-size
product per tap for addcmul's unit scale; this one accumulates the taps' input gradients into one tensor in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _tap_masks(seq_idx: torch.Tensor | None, width: int, dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Per tap j, (B, T, 1): 1 where the step it reads (width - 1 - j back) lies in the same document, else 0;
    None for the last tap (the step itself) and without `seq_idx`."""
    if seq_idx is None:
        return [None] * width
    T = seq_idx.shape[1]
    seg = seq_idx - seq_idx[:, :1]
    before = F.pad(seg, (width - 1, 0))  # (B, width - 1 + T): the steps before the first belong to the first document
    return [(before[:, j:j + T] == seg)[..., None].to(dtype) for j in range(width - 1)] + [None]


def _conv_sum(full: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, seq_idx: torch.Tensor | None
              ) -> torch.Tensor:
    """The conv as `width` shifted multiply-adds: (B, width - 1 + T, C) -> (B, T, C)."""
    width = taps.shape[0]
    T = full.shape[1] - width + 1
    out = None
    for j, mask in enumerate(_tap_masks(seq_idx, width, full.dtype)):
        inp = full[:, j:j + T] if mask is None else full[:, j:j + T] * mask
        out = torch.addcmul(bias, inp, taps[j]) if out is None else out.addcmul_(inp, taps[j])
    return out


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, full: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor,
                seq_idx: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(full, taps, seq_idx)
        return _conv_sum(full, taps, bias, seq_idx)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        full, taps, seq_idx = ctx.saved_tensors
        width = taps.shape[0]
        T = full.shape[1] - width + 1
        grad_full = torch.zeros_like(full) if ctx.needs_input_grad[0] else None
        grad_taps = torch.empty(taps.shape, dtype=grad.dtype, device=grad.device) if ctx.needs_input_grad[1] else None
        for j, mask in enumerate(_tap_masks(seq_idx, width, grad.dtype)):
            g = grad if mask is None else grad * mask
            if grad_full is not None:
                grad_full[:, j:j + T].addcmul_(g, taps[j])
            if grad_taps is not None:
                grad_taps[j] = (g * full[:, j:j + T]).sum((0, 1))
        grad_bias = grad.sum((0, 1)) if ctx.needs_input_grad[2] else None
        return grad_full, grad_taps, grad_bias, None


def causal_conv(full: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """out[:, t] = bias + sum_j taps[j] * full[:, t + j]: full (B, width - 1 + T, C) holds the width - 1 steps before
    the first, taps (width, C), bias (C,) -> (B, T, C). With `seq_idx` (B, T), packed documents: no tap reads a step
    of an earlier document (the steps before the first belong to the first)."""
    if torch.is_grad_enabled() and (full.requires_grad or taps.requires_grad or bias.requires_grad):
        return _CausalConv.apply(full, taps, bias, seq_idx)
    return _conv_sum(full, taps, bias, seq_idx)  # (decoding: no autograd.Function overhead per token)
