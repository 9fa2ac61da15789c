"""The Conba scan alone, forward without autograd, against its roofline: the PyTorch chunked form
(eager; compiled with --compile) and, on CUDA with triton installed, the Triton kernel, at each chunk
length, on the same inputs in one process.

Shapes default to issue #5's layer: 16 heads × 64, state 128, one key group. Variants: open loop (SSD)
or delta rule, τ = 0 or 2. Per row: median ms; GFLOP/s from the chunked algorithm's matmuls (counted
from the shapes, as in `bench speed`) and its fraction of the measured matmul peak; GB/s of the bytes
the scan must move (x, k, q, decays and gains read; y and the final state written) and its fraction
of the measured copy bandwidth; `x_roofline`, the time over max(FLOPs / peak, bytes / bandwidth); and
`max_err`, the largest difference from the first form's output (the forms compute one function). The forms
of one (variant, T, B) are timed in rounds that call each once (`interleaved_median_seconds`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mixcon.benchmarks import common
from mixcon.benchmarks.speed import scan_flops
from mixcon.cli.common import number_type
from mixcon.ops import conba_scan
from mixcon.ops.contract import triton_chunk_ok
from mixcon.ops.dtypes import DTYPES

VARIANTS = {"ssd": (False, 0), "ssd-tau2": (False, 2), "control": (True, 0), "control-tau2": (True, 2)}
COLUMNS = ["variant", "T", "B", "form", "ms", "gflops", "peak_frac", "gbs", "bw_frac", "x_roofline", "max_err"]

Scan = Callable[..., tuple[torch.Tensor, ...]]


def scan_inputs(B: int, T: int, H: int, P: int, G: int, N: int, device: str, dtype: torch.dtype
                ) -> tuple[torch.Tensor, ...]:
    """x (B, T, H, P), k, q (B, T, G, N) in `dtype` (keys and queries of unit norm, as with control);
    log decays and gains (B, T, H) in fp32, as a Conba layer makes them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, P, generator=g)
    k = F.normalize(torch.randn(B, T, G, N, generator=g), dim=-1)
    q = F.normalize(torch.randn(B, T, G, N, generator=g), dim=-1)
    log_decay = -F.softplus(torch.randn(B, T, H, generator=g) - 3)  # mild decays, as Mamba-2's init gives
    beta = torch.rand(B, T, H, generator=g)
    return (*(t.to(device, dtype) for t in (x, k, q)), log_decay.to(device), beta.to(device))


def forms(chunks: list[int], compiled: bool, triton: bool, value_blocks: list[int] | None = None, P: int = 64
          ) -> list[tuple[str, int, Scan]]:
    """(name, chunk length, scan) of each implementation at each chunk length: `torch` (ops.conba_scan),
    `torch+compile`, `triton` (ops.triton_chunk.conba_scan_triton; `triton cC vV` for each distinct number of
    value columns per program that `value_blocks` give heads of P, when given, else its default)."""
    out: list[tuple[str, int, Scan]] = []
    if triton:
        from mixcon.ops.triton_chunk import VALUE_BLOCK, conba_scan_triton, value_columns

        columns = sorted({value_columns(P, v) for v in value_blocks or [VALUE_BLOCK]})
    for C in chunks:
        def chunked(*args: Any, C: int = C, **kw: Any) -> tuple[torch.Tensor, ...]:
            return conba_scan(*args, chunk_size=C, **kw)

        out.append((f"torch c{C}", C, chunked))
        if compiled:
            out.append((f"torch+compile c{C}", C, torch.compile(chunked, dynamic=False)))
        if triton:
            for V in columns:
                def kernel(*args: Any, C: int = C, V: int = V, **kw: Any) -> tuple[torch.Tensor, ...]:
                    return conba_scan_triton(*args, chunk_size=C, value_block=V, **kw)

                out.append((f"triton c{C}" + (f" v{V}" if value_blocks else ""), C, kernel))
    return out


def run(lengths: list[int], batches: list[int], repeats: int, out_dir: Path | None, *, heads: int = 16,
        head_dim: int = 64, state: int = 128, groups: int = 1, chunks: tuple[int, ...] = (32, 64),
        variants: tuple[str, ...] = tuple(VARIANTS), device: str = "cpu", dtype: torch.dtype = torch.float32,
        compiled: bool = False, triton: bool | None = None, value_blocks: list[int] | None = None
        ) -> list[dict[str, Any]]:
    """Time every form on every (variant, T, B); `triton` defaults to: on CUDA with triton installed."""
    if triton is None:
        triton = common.triton_default(device)
    if compiled:  # one code object per chunk length, recompiled per variant and shape
        torch._dynamo.config.cache_size_limit = 64
    peak = common.matmul_peak_gflops(n=8192 if device.startswith("cuda") else 2048, device=device, dtype=dtype)
    bandwidth = common.copy_bandwidth_gbs(device=device)
    print(f"matmul peak {peak:.1f} GFLOP/s, copy {bandwidth:.1f} GB/s on {device} {dtype} "
          f"({torch.get_num_threads()} threads)")
    H, P, N, G = heads, head_dim, state, groups
    implementations = forms(list(chunks), compiled, triton, value_blocks, P)
    rows: list[dict[str, Any]] = []
    for T in lengths:
        for B in batches:
            inputs = scan_inputs(B, T, H, P, G, N, device, dtype)
            moved = sum(t.nbytes for t in (inputs[0], *inputs)) + B * H * P * N * 4  # y as x; S_T in fp32
            for variant in variants:
                delta_rule, tau = VARIANTS[variant]
                kw = dict(delta_rule=delta_rule, tau=tau,
                          delay_gain=torch.full((H,), 0.5, device=device) if tau else None)
                calls: dict[str, Callable[[], tuple[torch.Tensor, ...]]] = {}
                errors: dict[str, float] = {}
                chunk_of: dict[str, int] = {}
                first = y = None
                for name, C, scan in implementations:
                    if name.startswith("triton") and not triton_chunk_ok(C, tau):
                        continue
                    calls[name] = lambda scan=scan, inputs=inputs, kw=kw: scan(*inputs, **kw)
                    with torch.no_grad():
                        y = calls[name]()[0]
                    first = y if first is None else first
                    errors[name], chunk_of[name] = float((y.float() - first.float()).abs().max()), C
                first = y = None  # not held while the forms are timed
                with torch.no_grad():
                    medians = common.interleaved_median_seconds(calls, repeats=repeats, warmup=2)
                common.release_memory()
                for name, seconds in medians.items():
                    gflops = scan_flops(B, T, H, P, N, chunk_of[name], delta_rule, tau, G) / seconds / 1e9
                    gbs = moved / seconds / 1e9
                    rows.append(dict(variant=variant, T=T, B=B, form=name, ms=seconds * 1e3, gflops=gflops,
                                     peak_frac=gflops / peak, gbs=gbs, bw_frac=gbs / bandwidth,
                                     x_roofline=min(peak / gflops, bandwidth / gbs), max_err=errors[name]))
                common.print_table([r for r in rows if (r["variant"], r["T"], r["B"]) == (variant, T, B)], COLUMNS)
            print()
            if out_dir is not None:  # after every shape, so that a run stopped early keeps what it measured
                payload = dict(device=device, dtype=str(dtype), matmul_peak_gflops=peak,
                               copy_gbs=bandwidth, heads=H, head_dim=P, state=N, groups=G, rows=rows)
                common.write_results(out_dir, "scan", payload, _plot)
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (ax,) = common.new_figure(width=9)
    cases = list(dict.fromkeys((r["variant"], r["T"], r["B"]) for r in rows))
    for form in dict.fromkeys(r["form"] for r in rows):
        points = [(cases.index((r["variant"], r["T"], r["B"])), r["x_roofline"]) for r in rows if r["form"] == form]
        ax.plot(*zip(*points, strict=True), marker="o", label=form)
    ax.set_xticks(range(len(cases)), [f"{v}\nT={t} B={b}" for v, t, b in cases], fontsize=7)
    ax.set(yscale="log", ylabel="time / roofline time", title="Conba scan forward vs its roofline")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    positive, positive_list = number_type(int, 1), number_type(int, 1, many=True)
    p.add_argument("--lengths", type=positive_list, default="2048,8192", help="sequence lengths (default: %(default)s)")
    p.add_argument("--batches", type=positive_list, default="1,4", help="batch sizes (default: %(default)s)")
    p.add_argument("--heads", type=positive, default=16, help="H (default: %(default)s)")
    p.add_argument("--head-dim", type=positive, default=64, help="P (default: %(default)s)")
    p.add_argument("--state", type=positive, default=128, help="N (default: %(default)s)")
    p.add_argument("--groups", type=positive, default=1, help="G, key/query groups (default: %(default)s)")
    p.add_argument("--chunks", type=positive_list, default="32,64", help="chunk lengths (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {list(VARIANTS)} (default: all)")
    p.add_argument("--repeats", type=positive, default=5,
                   help="timed calls after two warm-ups (median; default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd chunked scans")
    p.add_argument("--value-blocks", type=positive_list, default=None,
                   help="time the Triton kernel at each of these value columns per program (powers of two >= 16; "
                        "default: its own, mixcon.ops.triton_chunk.VALUE_BLOCK)")
    common.add_out_argument(p, default=None)
    common.add_device_arguments(p)


def main(args: argparse.Namespace) -> int:
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise SystemExit(f"mixcon bench scan: --variants {','.join(unknown) or repr(args.variants)} unknown; choose "
                         f"from {list(VARIANTS)}")
    if bad := [v for v in args.value_blocks or [] if not triton_chunk_ok(v, 0)]:
        raise SystemExit(f"mixcon bench scan: --value-blocks {bad} must be powers of two >= 16")
    if args.value_blocks and not common.triton_default(args.device):
        raise SystemExit("mixcon bench scan: --value-blocks times the Triton kernel, which runs here only on CUDA with "
                         "triton installed")
    if args.heads % args.groups:
        raise SystemExit(f"mixcon bench scan: --heads {args.heads} must be a multiple of --groups {args.groups}")
    common.apply_precision(args)
    run(args.lengths, args.batches, args.repeats, args.out, heads=args.heads, head_dim=args.head_dim,
        state=args.state, groups=args.groups, chunks=tuple(args.chunks), variants=variants, device=args.device,
        dtype=DTYPES[args.dtype], compiled=args.compile, value_blocks=args.value_blocks)
    return 0
