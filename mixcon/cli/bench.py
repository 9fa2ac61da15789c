"""`mixcon bench speed|decode|matvec`: benchmarks against reference implementations, side by side."""

from __future__ import annotations

import argparse

from mixcon.benchmarks import decode, matvec, speed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed benchmarks (layer throughput, decode latency)",
                       description="Benchmarks that time mixcon and a baseline in the same process.")
    bench = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    s = bench.add_parser("speed", help="Conba layer vs transformers' Mamba2 vs the reference loop",
                         description=speed.__doc__)
    speed.add_arguments(s)
    s.set_defaults(func=speed.main)
    d = bench.add_parser("decode", help="generation latency and cache memory vs context length",
                         description=decode.__doc__)
    decode.add_arguments(d)
    d.set_defaults(func=decode.main)
    m = bench.add_parser("matvec", help="few-row products (decoding): ops.linear vs F.linear",
                         description=matvec.__doc__)
    matvec.add_arguments(m)
    m.set_defaults(func=matvec.main)
