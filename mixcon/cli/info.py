"""`mixcon info`: a config's layout, parameter counts and decoding-cache memory by context length."""

from __future__ import annotations

import argparse

import torch

from mixcon.cli.common import add_config_args, config_from_args
from mixcon.generation.cache import cache_nbytes
from mixcon.models.mixcon import MixConForCausalLM


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a config's layout, parameters and cache memory",
                       description="Build the model on the meta device (no memory) and print its block layout, "
                                   "parameter counts (total and active per token) and the decoding cache's size.")
    add_config_args(p)
    p.add_argument("--context", default="1024,4096,16384,32768,262144",
                   help="comma-separated context lengths for the cache table (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="dtype of K/V and conv tails (Conba states are fp32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    with torch.device("meta"):
        model = MixConForCausalLM(config)
    print(model.summary())
    dtype = getattr(torch, args.dtype)
    print(f"\ndecoding cache, batch {args.batch_size}, {args.dtype}:")
    for context in (int(c) for c in args.context.split(",")):
        print(f"  {context:>8d} tokens: {cache_nbytes(config, args.batch_size, context, dtype) / 2**30:10.3f} GiB")
    return 0
