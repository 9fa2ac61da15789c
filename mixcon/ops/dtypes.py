"""Precision policy: numerically sensitive parts run in fp32, or fp64 when the input is fp64."""

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; everything else is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # command-line names
