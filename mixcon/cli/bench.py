"""`mixcon bench speed|scan|decode|recall|filler|ablate|matvec|kernel`: benchmarks against baselines, side by side."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

from mixcon.benchmarks import ablate, decode, filler, kernel, matvec, recall, scan, speed
from mixcon.cli.common import DEFAULT_CONFIG, add_config_args, config_from_args


class Benchmark(NamedTuple):
    name: str
    module: ModuleType  # with add_arguments(parser) and main(args[, base])
    summary: str
    config: str | None  # --config's default, for a benchmark that builds its models from --config / --set
    keep_lines: bool = False  # the docstring's line breaks in --help (the studies' tables of options)


BENCHMARKS = [
    Benchmark("speed", speed, "Conba layer vs transformers' Mamba2 vs the reference loop", None),
    Benchmark("scan", scan, "the Conba scan alone vs its roofline: PyTorch chunked form, Triton kernel", None),
    Benchmark("decode", decode, "generation latency and cache memory vs context length", DEFAULT_CONFIG),
    Benchmark("recall", recall, "associative recall: MixCon vs its Transformer and Conba twins, trained", "tiny",
              True),
    Benchmark("filler", filler, "uninformative tokens: MixCon vs its twins on text with fillers inserted", "tiny",
              True),
    Benchmark("ablate", ablate, "ablations: variants of a model trained on the same bytes, over seeds", "tiny", True),
    Benchmark("matvec", matvec, "few-row products (decoding): ops.linear vs F.linear", None),
    Benchmark("kernel", kernel, "registers and spills of the Triton scan kernel, compiled for GPUs", None),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed vs baselines; trained studies of MixCon's twins",
                       description="Speed benchmarks that time mixcon and a baseline in the same process (speed, "
                       "scan, decode, matvec; kernel: the Triton kernel's registers), and studies that train "
                       "MixCon beside its twins or variants and score them (recall, filler, ablate).")
    bench = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module, summary, config, keep_lines in BENCHMARKS:
        formatter = argparse.RawDescriptionHelpFormatter if keep_lines else argparse.HelpFormatter
        b = bench.add_parser(name, help=summary, description=module.__doc__, formatter_class=formatter)
        if config is not None:
            add_config_args(b, default=config)
        module.add_arguments(b)
        b.set_defaults(func=module.main if config is None else _on_config(module.main))


def _on_config(main: Callable[..., int]) -> Callable[[argparse.Namespace], int]:
    """`main(args, base=...)` on the model of --config / --set (the benchmark builds its twins or variants)."""
    return lambda args: main(args, base=config_from_args(args))
