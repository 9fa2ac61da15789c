"""`mixcon bench speed|scan|decode|recall|filler|ablate|matvec|kernel`: benchmarks against baselines, side by side."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from mixcon.benchmarks import ablate, decode, filler, kernel, matvec, recall, scan, speed
from mixcon.cli.common import DEFAULT_CONFIG, add_config_args, config_from_args

# (name, module, help, --config default): a benchmark with a default builds its models from --config / --set
# (and twins or variants of it); the trained studies (a "tiny" default) keep their docstrings' line breaks.
BENCHMARKS = [
    ("speed", speed, "Conba layer vs transformers' Mamba2 vs the reference loop", None),
    ("scan", scan, "the Conba scan alone vs its roofline: PyTorch chunked form, Triton kernel", None),
    ("decode", decode, "generation latency and cache memory vs context length", DEFAULT_CONFIG),
    ("recall", recall, "associative recall: MixCon vs its Transformer and Conba twins, trained", "tiny"),
    ("filler", filler, "uninformative tokens: MixCon vs its twins on text with fillers inserted", "tiny"),
    ("ablate", ablate, "ablations: variants of a model trained on the same bytes, over seeds", "tiny"),
    ("matvec", matvec, "few-row products (decoding): ops.linear vs F.linear", None),
    ("kernel", kernel, "registers and spills of the Triton scan kernel, compiled for GPUs", None),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed vs baselines; trained studies of MixCon's twins",
                       description="Speed benchmarks that time mixcon and a baseline in the same process (speed, "
                       "scan, decode, matvec; kernel: the Triton kernel's registers), and studies that train "
                       "MixCon beside its twins or variants and score them (recall, filler, ablate).")
    bench = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module, summary, config in BENCHMARKS:
        raw = config == "tiny"
        b = bench.add_parser(name, help=summary, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter)
        if config is not None:
            add_config_args(b, default=config)
        module.add_arguments(b)
        b.set_defaults(func=module.main if config is None else _on_config(module.main))


def _on_config(main: Callable[..., int]) -> Callable[[argparse.Namespace], int]:
    """`main(args, base=...)` on the model of --config / --set (the benchmark builds its twins or variants)."""
    return lambda args: main(args, base=config_from_args(args))
