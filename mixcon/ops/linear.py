"""x Wᵀ for a few rows: a form that torch.compile turns into one memory-bound loop on a CPU."""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F


def slow_blas_rows() -> bool:
    """Whether the multiply-sum forms beat this CPU's BLAS at few rows: everywhere but MKL (torch's x86 BLAS) on an
    Intel CPU, which reads a one-row product's weights 1.8x faster than the multiply-sum eager, and compiled is
    the faster from two rows on (docs/benchmarks.md §22). On an AMD CPU MKL reads them at 7-8 GB/s where the
    multiply-sum reads 15-19 (§20); other BLAS libraries (ARM, builds without MKL) are not measured and keep the
    multiply-sum forms."""
    vendor = platform.processor()  # e.g. "Intel64 Family 6 ..., GenuineIntel" on Windows, "" on Linux
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line for line in f if line.startswith("vendor_id")), vendor)
    except OSError:
        pass
    return not (torch.backends.mkl.is_available() and "GenuineIntel" in vendor)


SLOW_BLAS_ROWS = slow_blas_rows()
# Up to this many rows (a decoding step's batch), the multiply-sum form wins under torch.compile on a CPU whose
# BLAS is slow at them (AMD EPYC: 3.7x the BLAS call's speed for one row, 1.5x for 16, 0.9x for 32); where MKL is
# quick (Intel Xeon), only for one row: 1.21x, 0.70x at two (`mixcon bench matvec`, docs/benchmarks.md §22).
FEW_ROWS = 16 if SLOW_BLAS_ROWS else 1
# An eager one-row product's multiply-sum: its temporary per block of output rows (elements), and the longest row
# it takes (docs/benchmarks.md §20).
EAGER_BLOCK = 2**19
EAGER_MAX_K = 1024


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear: (..., K) @ (N, K)ᵀ (+ bias) -> (..., N).

    Compiled on a CPU with at most `FEW_ROWS` rows, the product is written as Σ_k x_k W_nk, which
    inductor emits as one vectorised reduction over all cores; a CPU BLAS runs such a
    matrix-vector product on one core at a fraction of the memory bandwidth (where it does: on other CPUs,
    `FEW_ROWS` is 1). Eager on such a CPU, one row (`_eager_row`) takes the same form; GPUs and more rows use
    F.linear.
    """
    if torch.compiler.is_compiling():
        if x.device.type == "cpu" and x.numel() <= FEW_ROWS * x.shape[-1]:
            y = (x[..., None, :] * weight).sum(-1)  # (..., N)
            return _as_autocast(y if bias is None else y + bias)
    elif not isinstance(x, torch.fx.Proxy) and _eager_row(x, weight, bias):  # (FX traces F.linear)
        # Blocks of output rows whose (rows, K) temporary stays in the caches (a large one is fresh memory).
        rows = max(1, EAGER_BLOCK // max(1, x.shape[-1]))
        blocks = weight.split(rows) if weight.shape[0] > rows else (weight,)
        parts = [(x[..., None, :] * w).sum(-1) for w in blocks]  # (..., rows) each
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (..., N)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _eager_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether an eager product takes the multiply-sum form: on a CPU whose BLAS is slow at one row
    (`SLOW_BLAS_ROWS`), one row (a decoding step of one sequence; an expert given one token) of at most
    `EAGER_MAX_K` inputs, fp32 or fp64 throughout (bf16 products would be rounded before the sum), outside autograd
    (its backward is slower than BLAS's) and autocast. There MKL's matrix-vector product reads the weight at 7-8
    GB/s on the 2-core EPYC of docs/benchmarks.md §20, the multiply-sum at 15-19 (its temporary stays in the
    caches; `mixcon bench matvec`); for longer rows MKL is as fast or faster."""
    return (SLOW_BLAS_ROWS and x.device.type == "cpu" and x.numel() == x.shape[-1] <= EAGER_MAX_K and weight.dim() == 2
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype) and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))))


def _as_autocast(y: torch.Tensor) -> torch.Tensor:
    """The multiply-sum's result in the dtype F.linear gives under CPU autocast (which casts products, not
    elementwise ops)."""
    cast = torch.is_autocast_enabled("cpu") and y.dtype == torch.float32  # autocast leaves fp64 as it is
    return y.to(torch.get_autocast_dtype("cpu")) if cast else y


def batched_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A weight per batch entry (gathered experts): (B, M, K) @ (B, N, K)ᵀ -> (B, M, N).

    Compiled on a CPU with at most `FEW_ROWS` rows per entry, the multiply-sum form of `linear`: one
    pass over each weight, read along K as stored; otherwise `torch.bmm`.
    """
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.shape[1] <= FEW_ROWS:
        return _as_autocast((x[:, :, None, :] * weight[:, None]).sum(-1))
    return torch.bmm(x, weight.transpose(1, 2))
