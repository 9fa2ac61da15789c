"""Which tensors carry tangents (`mixcon.ops._jvp.carries_tangents`): what a kernel outside autograd must refuse."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from mixcon.ops._jvp import carries_tangents


def test_duals_and_torch_func_wrappers_carry_tangents_plain_tensors_do_not():
    x = torch.ones(2, 3)
    assert not carries_tangents(x, None)
    with forward_ad.dual_level():
        assert carries_tangents(x, forward_ad.make_dual(x, torch.ones_like(x)))
    seen = []

    def record(t: torch.Tensor) -> torch.Tensor:
        seen.append(carries_tangents(t))
        return t.sum()

    torch.func.vmap(record)(x)  # a batched wrapper: no tangent, still not a plain tensor
    torch.func.jvp(record, (x,), (torch.ones_like(x),))
    torch.func.grad(record)(x)
    assert seen == [True, True, True]
