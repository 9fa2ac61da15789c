"""Serving memory of a config beside the architectures it is compared with (DESIGN.md §4; the MixCon paper's
Table 1 and its "longest context on one 80 GB GPU" figure, after Jamba's).

Weights are the parameter count (of the model built on the meta device) times the bytes per weight (2 in
bf16, 1 or 0.5 quantised to 8 or 4 bits); the cache is `cache_nbytes`, the formula `MixConCache`
allocates. Activations are left out: at batch 1 in decoding they are small beside both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixcon.config import MixConConfig
from mixcon.generation.cache import cache_nbytes
from mixcon.models.mixcon import MixConForCausalLM

THIS_MODEL = "this model"


def comparison_configs(config: MixConConfig) -> dict[str, MixConConfig]:
    """`config` and, at its widths, the architectures it is compared with: a dense Transformer (attention and
    an MLP in every layer), a Mixtral-like one (attention and an MoE of 8 experts, top-2, in every layer), a
    Jamba-like one (one attention layer per block of `layers_per_block`, Jamba's 1:7 for blocks of 8) and
    the pure Conba twin."""
    L = config.layers_per_block
    all_attention = config.placement(L)
    return {
        THIS_MODEL: config,
        "transformer": config.replace(**all_attention, moe_every=0, moe_pattern=None),
        "mixtral-like": config.replace(**all_attention, moe_every=1, moe_pattern=None, n_experts=8, top_k=2),
        "jamba-like": config.replace(**config.placement(1)),
        "conba": config.replace(**config.placement(0)),
    }


@dataclass
class Footprint:
    """What one config needs to serve `batch_size` sequences."""

    layout: str  # one block and the number of blocks when all blocks are alike
    params: int
    active_params: int
    weight_bytes: int
    cache_bytes: dict[int, int]  # context length -> bytes of the decoding cache
    max_context: float  # the longest context that fits the memory (math.inf: the cache does not grow)


def footprint(config: MixConConfig, contexts: list[int], *, memory_bytes: int, batch_size: int = 1,
              dtype: torch.dtype = torch.bfloat16, weight_bytes: float = 2) -> Footprint:
    """Parameters, weight bytes (`weight_bytes` per parameter: 2 in bf16, 1 quantised to 8 bits), cache bytes
    (K/V and conv tails in `dtype`, Conba states in fp32) and the longest context for which weights + cache
    fit in `memory_bytes`."""
    with torch.device("meta"):
        model = MixConForCausalLM(config)
    params = model.num_parameters()
    weights = math.ceil(params * weight_bytes)
    blocks = config.layout_string().split(" | ")
    layout = f"{blocks[0]} x{len(blocks)}" if len(set(blocks)) == 1 else " | ".join(blocks)
    return Footprint(layout=layout, params=params, active_params=model.num_parameters(active=True),
                     weight_bytes=weights,
                     cache_bytes={n: cache_nbytes(config, batch_size, n, dtype) for n in contexts},
                     max_context=max_context(config, memory_bytes - weights, batch_size, dtype))


def max_context(config: MixConConfig, budget: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> float:
    """The largest context whose cache takes at most `budget` bytes (0 when not even one token's fits;
    math.inf when the cache does not grow with the context, as a pure Conba model's)."""

    def fits(n: int) -> bool:
        return cache_nbytes(config, batch_size, n, dtype) <= budget

    if not fits(1):
        return 0
    if cache_nbytes(config, batch_size, 2, dtype) == cache_nbytes(config, batch_size, 1, dtype):
        return math.inf
    low, high = 1, 2  # fits(low), and the first `high` that does not fit is found by doubling
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
