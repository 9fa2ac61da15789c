"""The LM head and its cross-entropy in one pass over row chunks: the (N, V) logits never exist whole
(`linear_cross_entropy` for training, `linear_token_scores` for scoring).

With autograd, the gradients are computed chunk by chunk during the forward (softmax − one-hot is at
hand there) and only scaled in the backward, so the head's matmul runs once per chunk, as in
`F.cross_entropy(F.linear(h, W).float(), labels)`. A chunk's logits take 16 MiB at most; in fp32 and fp64 every
chunk writes them (and their softmax) over one buffer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mixcon.checks import check_dtype
from mixcon.ops.dtypes import compute_dtype

IGNORE = -100  # the label of a position that is not scored
CHUNK_ELEMENTS = 2**22  # logits per chunk: 16 MiB in fp32


def _check(name: str, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None) -> int:
    """Refuse inputs that do not fit together, by name; the rows per chunk."""
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
    if labels.shape != h.shape[:-1]:
        raise ValueError(f"{name}: labels {tuple(labels.shape)} must have h's shape without its last "
                         f"dimension, {tuple(h.shape[:-1])}")
    check_dtype(name, h, weight.dtype)
    return chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h Wᵀ at `labels` (IGNORE positions left out) -> scalar (fp32; fp64 for
    fp64 inputs).

    h (..., d); weight (V, d); labels (...). The matmuls run in h's dtype (or autocast's), the
    softmax in fp32 (fp64 for fp64 inputs). `chunk_rows` rows at a time (default: CHUNK_ELEMENTS / V).
    """
    rows = _check("linear_cross_entropy", h, weight, labels, chunk_rows)
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1).long()  # (N, d), (N,) int64 (older torch: gather)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, labels, rows)
    total, count, _, _ = _chunks(h, weight, labels, rows, grads=False)
    return total / count


@torch.no_grad()
def linear_token_scores(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_limit: int | None = None,
                        chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of h (..., d) and labels (...): the label's negative log-likelihood under the logits h Wᵀ
    (fp32, fp64 for fp64 inputs; 0 where IGNORE) and whether it is their argmax among the ids below
    `vocab_limit` (default all; True where IGNORE). No autograd; `chunk_rows` as in `linear_cross_entropy`."""
    rows = _check("linear_token_scores", h, weight, labels, chunk_rows)
    flat_h, flat_labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1).long()  # (N, d), (N,) int64
    nll = torch.zeros(flat_labels.shape, dtype=compute_dtype(h), device=h.device)
    greedy = torch.ones(flat_labels.shape, dtype=torch.bool, device=h.device)
    for part, _, keep, target, logits in _logit_chunks(flat_h, weight, flat_labels, rows, nll.dtype):
        greedy[part] = (logits[:, :vocab_limit].argmax(-1) == target[:, 0]) | ~keep
        picked = logits.gather(1, target)[:, 0]  # (r,)
        nll[part] = (_exp_logsumexp_(logits)[2] - picked) * keep
    return nll.view(labels.shape), greedy.view(labels.shape)


def _chunks(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int, grads: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(summed loss, scored count, ∂sum/∂h, ∂sum/∂weight), the gradients only when `grads`.

    The gradients are of the sum, not the mean: softmax − one-hot stays of order 1 when it is rounded to
    h's dtype, and the backward applies 1/count with the loss scale (in fp16, the mean's gradients
    would underflow before a GradScaler's scale could lift them). ∂sum/∂weight is kept in fp32."""
    dtype = compute_dtype(h)
    scored = labels != IGNORE  # (N,)
    total = torch.zeros((), dtype=dtype, device=h.device)
    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if grads else None
    # A chunk's sum over its rows may pass fp16's range (65,504) where h is large: that product in fp32, for fp16
    # inputs and under fp16 autocast alike (which would cast it back to fp16).
    grad_w_in_fp32 = h.dtype == torch.float16 or _fp16_autocast(h)
    plain = _products_in(h, dtype)
    for part, hc, keep, target, logits in _logit_chunks(h, weight, labels, rows, dtype):
        picked = logits.gather(1, target)[:, 0]  # (r,)
        e, sums, lse = _exp_logsumexp_(logits)  # e in place of the logits
        total += ((lse - picked) * keep).sum()
        if grads:
            p = e.div_(sums)  # softmax
            p.scatter_add_(1, target, -torch.ones_like(target, dtype=dtype))
            p.mul_(keep[:, None])  # (r, V) ∂sum/∂logits
            p = p.to(hc.dtype)
            grad_h[part] = p @ weight.to(hc.dtype)
            if grad_w_in_fp32:
                with torch.autocast(hc.device.type, enabled=False):
                    grad_w += p.t().to(dtype) @ hc.to(dtype)
            elif plain:
                # (V, d) accumulated in place, no (V, d) product per chunk; as out=, which FLOP counters see
                torch.addmm(grad_w, p.t(), hc, out=grad_w)
            else:
                grad_w += (p.t() @ hc).to(dtype)
    return total, scored.sum().to(dtype), grad_h, grad_w  # a count of 0 makes the mean nan, as F.cross_entropy's


def _logit_chunks(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int, dtype: torch.dtype
                  ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per chunk of `rows` rows of h (N, d): (its slice, its rows with ignored ones zeroed (r, d), which are scored
    (r,), their labels with ignored ones 0 (r, 1), the logits (r, V) in `dtype`), which the caller may overwrite.
    Products in `dtype` without autocast write every chunk's logits over one buffer: fresh logits per chunk (and
    logsumexp's temporary) cost an eager training step of `small` ~5 % (docs/benchmarks.md §39)."""
    buffer = h.new_empty(min(rows, h.shape[0]), weight.shape[0]) if _products_in(h, dtype) else None  # (r, V)
    for start in range(0, h.shape[0], rows):
        part = slice(start, start + rows)
        keep = labels[part] != IGNORE  # (r,)
        hc = h[part].masked_fill(~keep[:, None], 0)  # ignored rows (pads) count nothing, even non-finite ones
        if buffer is not None:
            logits = torch.mm(hc, weight.t(), out=buffer[: hc.shape[0]])
        else:
            logits = (hc @ weight.t()).to(dtype)
        yield part, hc, keep, labels[part].masked_fill(~keep, 0)[:, None], logits


def _exp_logsumexp_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e = exp(logits − max) written over `logits`, e's row sums (r, 1), logsumexp (r,)), as `torch.logsumexp`
    computes them (an infinite max counts as 0) but without its (r, V) temporary (fresh memory at every chunk, as
    `_logit_chunks` says)."""
    top = logits.amax(-1, keepdim=True)  # (r, 1)
    top.masked_fill_(top.abs() == float("inf"), 0)
    e = logits.sub_(top).exp_()
    sums = e.sum(-1, keepdim=True)
    return e, sums, sums.log()[:, 0] + top[:, 0]


def _products_in(h: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether products of h run in `dtype` (h of that dtype, no autocast)."""
    return h.dtype == dtype and not torch.is_autocast_enabled(h.device.type)


def _fp16_autocast(t: torch.Tensor) -> bool:
    """Whether autocast runs t's products in fp16."""
    device = t.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, h: torch.Tensor, weight: torch.Tensor,
                labels: torch.Tensor, rows: int) -> torch.Tensor:
        total, count, grad_h, grad_w = _chunks(h, weight, labels, rows, grads=True)
        # fp16's range cannot hold the sum's gradients unscaled: kept in fp32 there, in the weight's dtype else.
        ctx.save_for_backward(grad_h, grad_w if weight.dtype == torch.float16 else grad_w.to(weight.dtype), count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients were computed in the forward: first order only
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        grad_h, grad_w, count = ctx.saved_tensors
        # The loss scale and the mean's 1/count, in fp32; with no scored row the gradients are zero (not nan), so
        # a caller may weight an empty batch's (nan) mean by 0.
        scale = grad_loss.to(count.dtype) / count.clamp(min=1)

        def scaled(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            if grad.dtype == torch.float16:  # the product in fp32: a loss scale times fp16 gradients may overflow
                return (grad.to(scale.dtype) * scale).to(dtype)
            return (grad * scale.to(grad.dtype)).to(dtype)

        return scaled(grad_h, grad_h.dtype), scaled(grad_w, ctx.weight_dtype), None, None
