"""Precision policy: numerically sensitive parts run in fp32, or fp64 when the input is fp64."""

import torch


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else is computed (and Conba states kept) in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """`compute_dtype_for` the tensor's dtype."""
    return compute_dtype_for(t.dtype)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # command-line names


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype given as a torch.dtype, a command-line name ("bf16"), a torch name ("bfloat16") or "auto" / None
    (None: keep what is there)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return None
        found = DTYPES.get(dtype, getattr(torch, dtype.removeprefix("torch."), None))
        if isinstance(found, torch.dtype) and found.is_floating_point:
            return found
    raise ValueError(f"dtype={dtype!r}: expected a floating torch.dtype, 'auto', one of {sorted(DTYPES)} or a "
                     "torch name such as 'bfloat16'")
