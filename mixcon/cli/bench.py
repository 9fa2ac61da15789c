"""`mixcon bench speed|scan|decode|recall|filler|ablate|matvec|kernel`: benchmarks against baselines, side by side."""

from __future__ import annotations

import argparse

from mixcon.benchmarks import ablate, decode, filler, kernel, matvec, recall, scan, speed
from mixcon.cli.common import add_config_args, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed vs baselines; trained studies of MixCon's twins",
                       description="Speed benchmarks that time mixcon and a baseline in the same process (speed, "
                       "scan, decode, matvec; kernel: the Triton kernel's registers), and studies that train "
                       "MixCon beside its twins or variants and score them (recall, filler, ablate).")
    bench = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    s = bench.add_parser("speed", help="Conba layer vs transformers' Mamba2 vs the reference loop",
                         description=speed.__doc__)
    speed.add_arguments(s)
    s.set_defaults(func=speed.main)
    c = bench.add_parser("scan", help="the Conba scan alone vs its roofline: PyTorch chunked form, Triton kernel",
                         description=scan.__doc__)
    scan.add_arguments(c)
    c.set_defaults(func=scan.main)
    d = bench.add_parser("decode", help="generation latency and cache memory vs context length",
                         description=decode.__doc__)
    add_config_args(d)
    decode.add_arguments(d)
    d.set_defaults(func=_decode)
    r = bench.add_parser("recall", help="associative recall: MixCon vs its Transformer and Conba twins, trained",
                         description=recall.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(r, default="tiny")
    recall.add_arguments(r)
    r.set_defaults(func=_recall)
    f = bench.add_parser("filler", help="uninformative tokens: MixCon vs its twins on text with fillers inserted",
                         description=filler.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(f, default="tiny")
    filler.add_arguments(f)
    f.set_defaults(func=_filler)
    a = bench.add_parser("ablate", help="ablations: variants of a model trained on the same bytes, over seeds",
                         description=ablate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(a, default="tiny")
    ablate.add_arguments(a)
    a.set_defaults(func=_ablate)
    m = bench.add_parser("matvec", help="few-row products (decoding): ops.linear vs F.linear",
                         description=matvec.__doc__)
    matvec.add_arguments(m)
    m.set_defaults(func=matvec.main)
    k = bench.add_parser("kernel", help="registers and spills of the Triton scan kernel, compiled for GPUs",
                         description=kernel.__doc__)
    kernel.add_arguments(k)
    k.set_defaults(func=kernel.main)


def _decode(args: argparse.Namespace) -> int:
    """The decode benchmark on the model of --config / --set (its twins and transformers' at its widths)."""
    return decode.main(args, base=config_from_args(args))


def _recall(args: argparse.Namespace) -> int:
    """The recall benchmark on the model of --config / --set and its twins."""
    return recall.main(args, base=config_from_args(args))


def _filler(args: argparse.Namespace) -> int:
    """The filler benchmark on the model of --config / --set and its twins."""
    return filler.main(args, base=config_from_args(args))


def _ablate(args: argparse.Namespace) -> int:
    """The ablation benchmark on the model of --config / --set and its variants."""
    return ablate.main(args, base=config_from_args(args))
