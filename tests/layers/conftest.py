"""Fixtures of the layer tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mixcon.layers.context import ForwardContext


@pytest.fixture
def poisoned_pads() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """(layer, d_model, bad) -> the real positions' outputs of a layer on two rows, the first with 3 leading pads,
    on finite inputs and with the pads' inputs set to `bad` (inf, nan): (with finite pads, with bad ones)."""

    def run(layer: torch.nn.Module, d_model: int, bad: float) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        u = torch.randn(2, 9, d_model)
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[0, :3] = False
        poisoned = u.clone()
        poisoned[0, :3] = bad
        with torch.no_grad():
            outs = [layer.eval()(x, ForwardContext.build(mask, 2, 9, None, u.device))[mask] for x in (u, poisoned)]
        return outs[0], outs[1]

    return run
