"""Registers and spills of the Triton scan kernel, compiled for NVIDIA GPUs on any machine.

Triton's wheel ships NVIDIA's assembler (ptxas), so the kernel compiles to GPU machine code without
a GPU, and ptxas reports what each variant needs per thread: registers, and the bytes spilled to
local memory when they run out (loads and stores inside the kernel's loop over chunks). Variants:
target architecture × input dtype × chunk steps × value columns per program, with the launch options
`conba_scan_triton` uses (`launch_options`), delta rule and past states on (a MixCon prefill). Compiled without the
divisibility hints a real launch adds for its pointers and strides. Needs triton, and its compiler
rather than its interpreter (TRITON_INTERPRET unset).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from mixcon.benchmarks import common
from mixcon.cli.common import number_type
from mixcon.ops.contract import triton_chunk_ok
from mixcon.ops.dtypes import DTYPES

PTXAS_STATS = {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
               "spill_loads": r"(\d+) bytes spill loads", "stack": r"(\d+) bytes stack frame"}


def compile_kernel(arch: int, dtype: torch.dtype, block: int, P: int = 64, N: int = 64, tau: int = 2,
                   delta_rule: bool = True, value_block: int | None = None) -> dict[str, Any]:
    """Compile the scan kernel for sm_`arch` and return ptxas's per-thread figures and shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    except ImportError as e:  # Triton 3.2 and before name its ptxas otherwise
        raise RuntimeError(f"mixcon bench kernel needs Triton >= 3.3 (found {triton.__version__})") from e

    from mixcon.ops.triton_chunk import VALUE_BLOCK, _conba_scan_kernel, launch_options

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("mixcon bench kernel compiles with Triton's compiler: unset TRITON_INTERPRET")
    options = launch_options(dtype, P, N, block, value_block or VALUE_BLOCK)
    compile_options = {name: options.pop(name) for name in ("num_warps", "enable_fp_fusion")}
    constants = dict(options, DELTA=delta_rule, TAU=tau, PAST=tau > 0)
    element = next(name for name, d in DTYPES.items() if d == dtype)  # Triton's names are the same
    signature, constexprs = {}, {}
    for i, param in enumerate(_conba_scan_kernel.params):
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", constants[param.name]
        elif param.name.endswith("_ptr"):  # x, k, q come in the model's dtype; the rest is fp32
            signature[param.name] = f"*{element}" if param.name in ("x_ptr", "k_ptr", "q_ptr") else "*fp32"
        else:
            signature[param.name] = "i32"
    source = ASTSource(fn=_conba_scan_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=compile_options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                                 f"--gpu-name={sm_arch_from_capability(arch)}", str(ptx), "-o", str(ptx) + ".o"],
                                capture_output=True, text=True, check=True).stderr
    row: dict[str, Any] = {"arch": f"sm_{arch}", "dtype": element, "block": block, "value_block": options["BP"],
                           "precision": options["PREC"], "warps": compile_options["num_warps"]}
    for name, pattern in PTXAS_STATS.items():
        found = re.search(pattern, report)
        row[name] = int(found.group(1)) if found else 0
    row["shared_KiB"] = compiled.metadata.shared / 1024
    return row


def run(archs: list[int], dtypes: list[torch.dtype], blocks: list[int], P: int, N: int, tau: int,
        out_dir: Path | None, value_blocks: list[int] | None = None) -> list[dict[str, Any]]:
    """Compile every variant and print a table; JSON and a bar plot of the spills to out_dir."""
    rows = [compile_kernel(arch, dtype, block, P, N, tau, value_block=vb) for arch in archs for dtype in dtypes
            for block in blocks for vb in value_blocks or [None]]
    common.print_table(rows, list(rows[0]))
    if out_dir is not None:
        payload = dict(P=P, N=N, tau=tau, rows=rows)
        common.write_results(out_dir, "kernel", payload, _plot)
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (ax,) = common.new_figure(width=7.0)
    labels = [f"{r['arch']} {r['dtype']} C={r['block']} BP={r['value_block']}" for r in rows]
    ax.barh(labels, [r["spill_stores"] for r in rows])
    ax.set(xlabel="spill stores (bytes per thread)", title="Triton scan kernel: registers spilled")
    ax.grid(axis="x", alpha=0.3)
    common.save_figure(fig, path)


ARCHS = (75, 80, 86, 87, 89, 90, 100, 103, 120)  # NVIDIA compute capabilities that Triton compiles for


def _archs(text: str) -> list[int]:
    """argparse type of --arch: compute capabilities among ARCHS."""
    values = number_type(int, 1, many=True)(text)
    if any(v not in ARCHS for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated compute capabilities among "
                                         f"{', '.join(map(str, ARCHS))}, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", type=_archs, default="80,90",
                   help=f"compute capabilities, of {', '.join(map(str, ARCHS))}: e.g. 80 (A100), 90 (H100) "
                        "(default: %(default)s)")
    p.add_argument("--dtypes", default="bf16,fp32", help=f"of x, k, q; of {sorted(DTYPES)} (default: %(default)s)")
    p.add_argument("--blocks", type=number_type(int, 1, many=True), default="32,64",
                   help="steps per chunk of the kernel (default: %(default)s)")
    p.add_argument("--value-blocks", type=number_type(int, 1, many=True), default=None,
                   help="value columns per program (default: the kernel's, "
                        "mixcon.ops.triton_chunk.VALUE_BLOCK)")
    p.add_argument("--head-dim", type=number_type(int, 1), default=64, help="P (default: %(default)s)")
    p.add_argument("--state", type=number_type(int, 1), default=64, help="N (default: %(default)s)")
    p.add_argument("--tau", type=number_type(int, 0), default=2, help="readout delay (default: %(default)s)")
    common.add_precision_argument(p, when="compiling")
    common.add_out_argument(p, default=None)


def main(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.dtypes.split(",")) - set(DTYPES))
    if unknown:
        raise SystemExit(f"mixcon bench kernel: --dtypes: unknown {unknown}; allowed: {sorted(DTYPES)}")
    bad = [b for b in args.blocks if not triton_chunk_ok(b, args.tau)]
    if bad:
        raise SystemExit(f"mixcon bench kernel: --blocks: {bad} must be powers of two >= 16 and >= --tau={args.tau}")
    if bad := [b for b in args.value_blocks or [] if not triton_chunk_ok(b, 0)]:
        raise SystemExit(f"mixcon bench kernel: --value-blocks: {bad} must be powers of two >= 16")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise SystemExit("mixcon bench kernel: needs triton: pip install 'mixcon[triton]'") from None
    common.apply_precision(args)
    run(args.arch, [DTYPES[d] for d in args.dtypes.split(",")], args.blocks, args.head_dim, args.state, args.tau,
        args.out, args.value_blocks)
    return 0
