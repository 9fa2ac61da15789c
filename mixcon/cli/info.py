"""`mixcon info`: a config's (or a saved model's) layout, parameter counts and decoding-cache memory by context
length; with --compare, beside a dense Transformer, Mixtral-like, Jamba-like and pure Conba models of its widths."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from mixcon.benchmarks.common import new_figure, plot_file, print_table, save_figure
from mixcon.cli.common import add_config_args, config_from_args, number_type
from mixcon.generation.cache import cache_nbytes
from mixcon.generation.footprint import THIS_MODEL, Footprint, comparison_configs, footprint
from mixcon.models.files import read_config
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.ops.dtypes import DTYPES
from mixcon.training import checkpoint as ckpt

WEIGHT_BITS, MEMORY_GIB = 16, 80.0  # --compare's defaults: bf16 weights, an 80 GB device (the MixCon paper's)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's layout, parameters and cache memory",
                       description="Build the model on the meta device (no memory) and print its block layout, "
                                   "parameter counts (total and active per token) and the decoding cache's size; "
                                   "with --checkpoint, of a saved model, and where it stands in training.")
    add_config_args(p)
    p.set_defaults(config=None)  # None: DEFAULT_CONFIG, or the checkpoint's
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="a run directory, checkpoint, save_pretrained or export directory instead of --config")
    p.add_argument("--context", type=number_type(int, 1, many=True), default="1024,4096,16384,32768,262144",
                   help="comma-separated context lengths for the cache table (default: %(default)s)")
    p.add_argument("--batch-size", type=number_type(int, 1), default=1, help="sequences decoded at once (default: "
                   "%(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="dtype of K/V and conv tails (Conba states are fp32; default: %(default)s)")
    p.add_argument("--compare", action="store_true",
                   help="a table of this model beside a dense Transformer, a Mixtral-like, a Jamba-like and a pure "
                        "Conba model of its widths: parameters, weight and cache memory, and the longest context "
                        "that fits in --memory-gib (the MixCon paper's Table 1 and 80 GB figure)")
    p.add_argument("--weight-bits", type=int, choices=[32, 16, 8, 4], default=None,
                   help=f"bits per weight for --compare (8 or 4: quantised; default: {WEIGHT_BITS})")
    p.add_argument("--memory-gib", type=number_type(float, 0, above=True), default=None,
                   help=f"device memory for --compare's longest context (default: {MEMORY_GIB:g})")
    p.add_argument("--plot", type=plot_file, default=None, metavar="FILE",
                   help="with --compare, also draw cache memory vs context and the longest contexts to FILE "
                        "(.png, .svg, .pdf, ...: a format matplotlib writes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("--plot", args.plot), ("--weight-bits", args.weight_bits),
                                      ("--memory-gib", args.memory_gib)) if value is not None]
    if given and not args.compare:
        raise SystemExit(f"mixcon info: {', '.join(given)}: only for the --compare table; add --compare")
    weight_bits = WEIGHT_BITS if args.weight_bits is None else args.weight_bits
    memory_gib = MEMORY_GIB if args.memory_gib is None else args.memory_gib
    if args.checkpoint is None:
        config = config_from_args(args)
    elif args.config is not None or args.overrides:
        raise SystemExit("mixcon info: --checkpoint names the model; drop --config / --set")
    else:
        try:
            directory = ckpt.model_directory(args.checkpoint)
            config, _ = read_config(directory)
            state = ckpt.read_trainer_state(directory) if (directory / ckpt.STATE_FILE).is_file() else None
        except (ckpt.CheckpointError, OSError, ValueError) as e:
            raise SystemExit(f"mixcon info: {e}") from e
        print(f"checkpoint: {directory}")
        if state is not None:
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
    dtype = DTYPES[args.dtype]
    print(f"\ndecoding cache, batch {args.batch_size}, {args.dtype}:")
    for context in args.context:
        print(f"  {context:>8d} tokens: {cache_nbytes(config, args.batch_size, context, dtype) / 2**30:10.3f} GiB")
    if args.compare:
        try:
            configs = comparison_configs(config)
        except ValueError as e:
            raise SystemExit(f"mixcon info: --compare: {e}") from e
        rows = {name: footprint(c, args.context, memory_bytes=int(memory_gib * 2**30), batch_size=args.batch_size,
                                dtype=dtype, weight_bytes=weight_bits / 8) for name, c in configs.items()}
        print(f"\nbeside other architectures of its widths ({weight_bits}-bit weights, K/V in {args.dtype}, batch "
              f"{args.batch_size}, {memory_gib:g} GiB):")
        _print_comparison(rows, args.context, memory_gib)
        if args.plot is not None:
            _plot(rows, args.context, memory_gib, args.plot)
            print(f"wrote {args.plot}")
    return 0


def _context(n: float) -> str:
    return "no limit" if math.isinf(n) else f"{n:,}" if n else "does not fit"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _print_comparison(rows: dict[str, Footprint], contexts: list[int], memory_gib: float) -> None:
    limit = f"max context ({memory_gib:g} GiB)"
    table = [{"model": name, "layout": f.layout, "params": _count(f.params), "active": _count(f.active_params),
              "weights GiB": f"{f.weight_bytes / 2**30:.2f}",
              **{f"cache@{n} GiB": f"{f.cache_bytes[n] / 2**30:.3f}" for n in contexts},
              limit: _context(f.max_context)} for name, f in rows.items()]
    print_table(table, list(table[0]))


def _plot(rows: dict[str, Footprint], contexts: list[int], memory_gib: float, path: Path) -> None:
    fig, (left, right) = new_figure(ncols=2, width=11.0)
    for (name, f), style in zip(rows.items(), ["-", "--", ":", "-.", (0, (1, 3))], strict=False):
        left.plot(contexts, [f.cache_bytes[n] / 2**30 for n in contexts], marker="o", linestyle=style, label=name)
    left.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decoding cache (GiB)",
             title="cache memory vs context")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    finite = [f.max_context for f in rows.values() if math.isfinite(f.max_context)]
    top = 1.25 * max(finite, default=1) or 1  # where a cache that does not grow ends its bar
    names = list(rows)
    right.barh(names, [min(f.max_context, top) for f in rows.values()],
               color=["tab:blue" if n == THIS_MODEL else "tab:gray" for n in names])
    for y, f in enumerate(rows.values()):
        right.text(min(f.max_context, top), y, f" {_context(f.max_context)}", va="center",
                   ha="right" if math.isinf(f.max_context) else "left", fontsize=8,
                   color="white" if math.isinf(f.max_context) else "black")
    right.set(xlim=(0, 1.15 * top), xlabel="tokens",
              title=f"longest context in {memory_gib:g} GiB (weights + cache)")
    right.invert_yaxis()
    save_figure(fig, path)
