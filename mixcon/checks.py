"""Checks of values at the library's boundary (configs, options, arguments, input tensors)."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import torch


def is_integer(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar(value: Any) -> bool:
    """A numpy scalar or a 0-d array or tensor, not of a boolean dtype."""
    return getattr(value, "ndim", None) == 0 and "bool" not in str(getattr(value, "dtype", "bool"))


def as_integer(value: Any) -> Any:
    """An integer-like argument (numpy integer, 0-d integer tensor) as an int; anything else as it is."""
    if is_integer(value) or isinstance(value, bool | float) or not _scalar(value):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def as_number(value: Any) -> Any:
    """A real-number-like argument (numpy scalar, 0-d tensor) as a float; ints, bools and the rest (complex, text)
    as they are."""
    dtype = str(getattr(value, "dtype", ""))
    real = "int" in dtype or "float" in dtype  # not float() of a complex (drops its imaginary part) or of text
    if isinstance(value, bool | int | float) or not (isinstance(value, numbers.Real) or (_scalar(value) and real)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def within(value: float, minimum: float | None = None, maximum: float | None = None, *, above: bool = False,
           below: bool = False) -> bool:
    """minimum <= value (< when `above`) and value <= maximum (< when `below`), for each bound given."""
    low = minimum is None or (value > minimum if above else value >= minimum)
    return low and (maximum is None or (value < maximum if below else value <= maximum))


def check_attention_mask(mask: torch.Tensor, shape: tuple[int, ...], of: str = "input_ids") -> None:
    """A padding mask of the (B, T) `shape` of the inputs named `of`, holding 1 (token) and 0 (pad) only (bool or
    numbers)."""
    if mask.shape != shape:
        raise ValueError(f"attention_mask must have the shape of {of} {shape}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all()):  # (bool: no pass, no host sync)
        return
    odd = mask[(mask != 0) & (mask != 1)][0].item()
    raise ValueError(f"attention_mask must hold 1 (token) and 0 (pad) only, got {odd!r} (for an additive mask, "
                     "where 0 keeps a token, pass mask == 0)")


def check_dtype(name: str, h: torch.Tensor, dtype: torch.dtype) -> None:
    """`h` must be in `dtype`, the weights' (outside autocast, which casts each product's inputs itself; quantised
    integer weights, as bitsandbytes' layers hold, are their layers' business)."""
    if h.dtype != dtype and dtype.is_floating_point and not torch.is_autocast_enabled(h.device.type):
        raise TypeError(f"{name}: input is {h.dtype}, the weights {dtype}: cast one to the other "
                        f"(or run under torch.autocast)")
