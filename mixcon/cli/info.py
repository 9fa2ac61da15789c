"""`mixcon info`: a config's (or a saved model's) layout, parameter counts and decoding-cache memory by context
length."""

from __future__ import annotations

import argparse

import torch

from mixcon.cli.common import add_config_args, config_from_args
from mixcon.generation.cache import cache_nbytes
from mixcon.models.mixcon import MixConForCausalLM, read_config
from mixcon.training import checkpoint as ckpt


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's layout, parameters and cache memory",
                       description="Build the model on the meta device (no memory) and print its block layout, "
                                   "parameter counts (total and active per token) and the decoding cache's size; "
                                   "with --checkpoint, of a saved model, and where it stands in training.")
    add_config_args(p)
    p.set_defaults(config=None)  # None: DEFAULT_CONFIG, or the checkpoint's
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="a run directory, checkpoint, save_pretrained or export directory instead of --config")
    p.add_argument("--context", default="1024,4096,16384,32768,262144",
                   help="comma-separated context lengths for the cache table (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="dtype of K/V and conv tails (Conba states are fp32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.checkpoint is None:
        config = config_from_args(args)
    elif args.config is not None or args.overrides:
        raise SystemExit("mixcon info: --checkpoint names the model; drop --config / --set")
    else:
        try:
            directory = ckpt.model_directory(args.checkpoint)
            config, _ = read_config(directory)
        except (ckpt.CheckpointError, OSError, ValueError) as e:
            raise SystemExit(f"mixcon info: {e}") from e
        print(f"checkpoint: {directory}")
        if (directory / ckpt.STATE_FILE).is_file():
            state = ckpt.read_trainer_state(directory)
            val = state.get("last_val") or {}
            line = f"trained: {state['step']} steps, {state['tokens']:,} tokens"
            if "val_loss" in val:
                line += f"; validation at step {val['step']}: loss {val['val_loss']:.4f}"
                if val.get("val_bpb") is not None:
                    line += f", {val['val_bpb']:.4f} bits per byte"
            print(line)
    with torch.device("meta"):
        model = MixConForCausalLM(config)
    print(model.summary())
    dtype = getattr(torch, args.dtype)
    print(f"\ndecoding cache, batch {args.batch_size}, {args.dtype}:")
    for context in (int(c) for c in args.context.split(",")):
        print(f"  {context:>8d} tokens: {cache_nbytes(config, args.batch_size, context, dtype) / 2**30:10.3f} GiB")
    return 0
