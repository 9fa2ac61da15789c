"""Few-row products x Wᵀ as in a decoding step: `mixcon.ops.linear` vs F.linear, side by side.

One compiled function chains products through a set of weight matrices too large for the caches
(by default the shapes of one `small` decoding step, repeated to ~70 MiB), so every weight comes from
memory (unless the CPU's last-level cache holds them). Rows are the decoding batch. Timed: F.linear
eager, `ops.linear` eager (one row on a CPU whose BLAS is slow at it, `SLOW_BLAS_ROWS`: the multiply-sum
in cache-sized blocks; else F.linear), F.linear compiled (the BLAS call inductor keeps) and `ops.linear`
compiled (the multiply-sum loop it uses up to FEW_ROWS rows: 16 where the BLAS is slow, else 1); GB/s =
weight bytes / time. The forms are timed in rounds that call each once (`interleaved_median_seconds`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mixcon.benchmarks import common
from mixcon.cli.common import number_type
from mixcon.ops.linear import FEW_ROWS, linear

# (N, K) of the products in one `small` decoding step: Conba in/out, MLP gate-up/down, attention qkv/out.
FORMS = ("F.linear eager", "ops.linear eager", "F.linear compiled", "ops.linear compiled")
SMALL_STEP = [(1168, 256), (256, 512), (1280, 256), (256, 640), (512, 256), (256, 256)]


def chain(weights: list[torch.Tensor], product: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (M, K0) -> every product in turn, each input cut or tiled from the last output (M, 8·n)."""

    def products(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for w in weights:
            k = w.shape[1]
            x = x.repeat(1, -(-k // x.shape[1]))[:, :k]
            x = torch.tanh(product(x, w))  # (M, N)
            outs.append(x[:, :8])
        return torch.cat(outs, dim=1)

    return products


def run(rows: list[int], megabytes: int, repeats: int, out_dir: Path | None) -> list[dict[str, Any]]:
    """Time the four forms for each row count over ~`megabytes` MiB of fp32 weights."""
    torch.manual_seed(0)
    per_step = sum(n * k for n, k in SMALL_STEP) * 4 / 2**20
    shapes = SMALL_STEP * max(1, round(megabytes / per_step))
    weights = [torch.randn(n, k) * k**-0.5 for n, k in shapes]
    nbytes = sum(w.nbytes for w in weights)
    print(f"{len(weights)} weight matrices, {nbytes / 2**20:.0f} MiB, {torch.get_num_threads()} threads, "
          f"few-row form up to {FEW_ROWS} rows")
    results = []
    for m in rows:
        torch._dynamo.reset()  # the forms share one code object: a fresh cache per row count, no limit
        forms = {"F.linear eager": chain(weights, F.linear),
                 "ops.linear eager": chain(weights, linear),
                 "F.linear compiled": torch.compile(chain(weights, F.linear), dynamic=False),
                 "ops.linear compiled": torch.compile(chain(weights, linear), dynamic=False)}
        x = torch.randn(m, shapes[0][1])
        row: dict[str, Any] = {"rows": m}
        medians = common.interleaved_median_seconds({name: lambda fn=fn, x=x: fn(x) for name, fn in forms.items()},
                                                    repeats=repeats, warmup=2)
        for name, seconds in medians.items():
            row[f"{name} ms"] = seconds * 1e3
            row[f"{name} GB/s"] = nbytes / seconds / 1e9
        common.release_memory()
        row["speed-up"] = row["F.linear compiled ms"] / row["ops.linear compiled ms"]
        results.append(row)
        common.print_table(results[-1:], list(row))
    if out_dir is not None:
        payload = dict(weight_MiB=nbytes / 2**20, rows=results)
        common.write_results(out_dir, "matvec", payload, _plot)
    return results


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (ax,) = common.new_figure()
    for name in FORMS:
        ax.plot([r["rows"] for r in rows], [r[f"{name} GB/s"] for r in rows], marker="o", label=name)
    ax.set(xscale="log", xlabel="rows (decoding batch)", ylabel="weight GB/s", title="few-row products")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=number_type(int, 1, many=True), default="1,2,4,8,16,32",
                   help="rows per product (default: %(default)s)")
    p.add_argument("--megabytes", type=number_type(int, 1), default=70,
                   help="total weight size in MiB, in whole decoding steps' weights (at least one: ~4.3 MiB; "
                        "default: %(default)s)")
    p.add_argument("--repeats", type=number_type(int, 1), default=20,
                   help="timed calls after two warm-ups (median; default: %(default)s)")
    common.add_out_argument(p)


def main(args: argparse.Namespace) -> int:
    run(args.rows, args.megabytes, args.repeats, args.out)
    return 0
