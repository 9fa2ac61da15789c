"""Depthwise causal conv over time in the (B, T, C) layout, with a hand-written gradient.

Written as `width` shifted multiply-adds: no transposes around conv1d, elementwise work that torch.compile fuses.
Autograd's gradient of that sum spends a zero-filled full-size tensor per tap on the shifted slices, and a full-size
product per tap for addcmul's unit scale; this one accumulates every tap's share into shifted slices of one tensor,
and the taps' gradients through one product buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixcon.ops._jvp import save_for_both, traced
from mixcon.ops.contract import check_seq_idx


def _tap_masks(seq_idx: torch.Tensor | None, width: int, dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Per tap j, (B, T, 1): 1 where the step it reads (width - 1 - j back) lies in the same document, else 0;
    None for the last tap (the step itself) and without `seq_idx`."""
    if seq_idx is None:
        return [None] * width
    T = seq_idx.shape[1]
    seg = seq_idx - seq_idx[:, :1]
    before = F.pad(seg, (width - 1, 0))  # (B, width - 1 + T): the steps before the first belong to the first document
    return [(before[:, j:j + T] == seg)[..., None].to(dtype) for j in range(width - 1)] + [None]


def _conv_sum(full: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor | None
              ) -> torch.Tensor:
    """The conv as `width` shifted multiply-adds: (B, width - 1 + T, C) -> (B, T, C)."""
    width = taps.shape[0]
    T = full.shape[1] - width + 1
    if T == 1 and seq_idx is None:  # one step (decoding, dispatch-bound): one product and one sum
        out = (full * taps).sum(1, keepdim=True)
        return out if bias is None else out + bias
    out = None
    for j, mask in enumerate(_tap_masks(seq_idx, width, full.dtype)):
        inp = full[:, j:j + T] if mask is None else full[:, j:j + T] * mask
        if out is None:
            out = inp * taps[j] if bias is None else torch.addcmul(bias, inp, taps[j])
        else:
            out = out.addcmul_(inp, taps[j])
    return out


class _CausalConv(torch.autograd.Function):
    """`_conv_sum` with the hand-written gradient of the module's docstring."""

    generate_vmap_rule = True  # torch.func: vmap, jacrev (jvp through the subclass)

    @staticmethod
    def forward(full: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor | None
                ) -> torch.Tensor:
        return _conv_sum(full, taps, bias, seq_idx)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        full, taps, _, seq_idx = inputs
        ctx.save_for_backward(full, taps, seq_idx)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        full, taps, seq_idx = ctx.saved_tensors
        width, n = taps.shape[0], full.shape[1]
        T = n - width + 1
        masks = _tap_masks(seq_idx, width, grad.dtype)
        grad_full = None
        if ctx.needs_input_grad[0]:  # full[:, t + j] met tap j at output t: summed into slices of one tensor
            grad_full = grad.new_zeros(full.shape)  # (B, width - 1 + T, C)
            for j, mask in enumerate(masks):
                grad_full[:, j:j + T].addcmul_(grad if mask is None else grad * mask, taps[j])
        grad_taps = None
        if ctx.needs_input_grad[1]:  # one product buffer for every tap, memory just touched (docs/benchmarks.md §39);
            # in-place products, which torch.func's batching rules take (out= ones they do not)
            product = torch.empty_like(grad)
            grad_taps = torch.stack([(product.copy_(grad) if mask is None else grad * mask).mul_(full[:, j:j + T])
                                     .sum((0, 1)) for j, mask in enumerate(masks)])
        grad_bias = grad.sum((0, 1)) if ctx.needs_input_grad[2] else None
        return grad_full, grad_taps, grad_bias, None


class _CausalConvJvp(_CausalConv):
    """The same with forward-mode AD (see `mixcon.ops._jvp`)."""

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        full, taps, _, seq_idx = inputs
        save_for_both(ctx, full, taps, seq_idx)

    @staticmethod
    def jvp(ctx: torch.autograd.function.FunctionCtx, d_full: torch.Tensor | None, d_taps: torch.Tensor | None,
            d_bias: torch.Tensor | None, _: None) -> torch.Tensor:
        full, taps, seq_idx = ctx.saved_tensors
        terms = [t for t in (d_bias, None if d_full is None else _conv_sum(d_full, taps, None, seq_idx),
                             None if d_taps is None else _conv_sum(full, d_taps, None, seq_idx)) if t is not None]
        return sum(terms[1:], terms[0])


def causal_conv(full: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """out[:, t] = bias + sum_j taps[j] * full[:, t + j]: full (B, width - 1 + T, C) holds the width - 1 steps before
    the first, taps (width, C), bias (C,) or None -> (B, T, C). With `seq_idx` (B, T), packed documents: no tap
    reads a step of an earlier document (the steps before the first belong to the first)."""
    _check_inputs(full, taps, bias, seq_idx)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (full, taps, bias)):
        return traced(_CausalConv, _CausalConvJvp).apply(full, taps, bias, seq_idx)
    return _conv_sum(full, taps, bias, seq_idx)  # (decoding: no autograd.Function overhead per token)


def _check_inputs(full: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None,
                  seq_idx: torch.Tensor | None) -> None:
    """Shapes of `causal_conv`'s arguments, and `seq_idx`'s dtype (its order is not read: the taps compare indices
    for equality only, and a second host sync per layer beside the scan's would cost training steps on a GPU)."""
    if full.dim() != 3:
        raise ValueError(f"causal_conv: full must be (B, width - 1 + T, C), got shape {tuple(full.shape)}")
    B, n, C = full.shape
    if taps.dim() != 2 or taps.shape[1] != C or not 1 <= taps.shape[0] <= n + 1:
        raise ValueError(f"causal_conv: taps must be (width, C) with C={C} and 1 <= width <= {n + 1} (full holds "
                         f"width - 1 steps before the first), got shape {tuple(taps.shape)}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"causal_conv: bias must be (C,)=({C},) or None, got shape {tuple(bias.shape)}")
    if seq_idx is not None:
        check_seq_idx(seq_idx, (B, n - taps.shape[0] + 1), "causal_conv: seq_idx", ordered=False)
