"""The precision policy and the dtype names models and command lines take (`mixcon.ops.dtypes`)."""

import pytest
import torch

from mixcon.ops.dtypes import DTYPES, compute_dtype, compute_dtype_for, resolve_dtype


def test_fp64_is_computed_in_fp64_everything_else_in_fp32():
    assert compute_dtype_for(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert compute_dtype_for(dtype) == torch.float32
    assert compute_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32


@pytest.mark.parametrize(("name", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             ("float16", torch.float16), ("torch.bfloat16", torch.bfloat16),
                                             ("float64", torch.float64), (torch.float16, torch.float16),
                                             ("auto", None), (None, None)])
def test_command_line_and_torch_names_resolve_to_their_dtype(name, dtype):
    assert resolve_dtype(name) == dtype
    if isinstance(name, str) and name in DTYPES:
        assert DTYPES[name] == dtype


@pytest.mark.parametrize("bad", ["int8", "bf15", "float8_e4m3fn", torch.int32, torch.float8_e5m2, 3])
def test_other_dtypes_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"expected one of torch.float32, float64, bfloat16, float16, 'auto'"):
        resolve_dtype(bad)
