"""Precision policy: numerically sensitive parts run in fp32, or fp64 when the input is fp64."""

import torch


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else is computed (and Conba states kept) in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """`compute_dtype_for` the tensor's dtype."""
    return compute_dtype_for(t.dtype)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # command-line names


# What a model's parameters may be: the dtypes every layer runs in (fp8 formats have no norms or softmax).
MODEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A model dtype (`MODEL_DTYPES`) given as a torch.dtype, a command-line name ("bf16"), a torch name
    ("bfloat16") or "auto" / None (None: keep what is there)."""
    if dtype is None or dtype in MODEL_DTYPES:
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return None
        found = DTYPES.get(dtype, getattr(torch, dtype.removeprefix("torch."), None))
        if found in MODEL_DTYPES:
            return found
    raise ValueError(f"dtype={dtype!r}: expected one of torch.float32, float64, bfloat16, float16, 'auto', "
                     f"{', '.join(sorted(DTYPES))} or a torch name such as 'bfloat16'")
