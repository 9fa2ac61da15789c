"""`mixcon.benchmarks.kernel`: the Triton kernel compiled for a GPU without one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixcon.cli import main


def test_kernel_report_compiles_the_triton_kernel_for_a_gpu(tmp_path):
    """The real compiler (not the interpreter the other Triton tests use on a CPU) takes the kernel to
    sm_90 machine code, fp32 and bf16, and ptxas's figures come back."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    if not (Path(triton.__file__).parent / "backends" / "nvidia").is_dir():
        pytest.skip("this triton has no NVIDIA backend")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 3):
        pytest.skip("mixcon bench kernel needs Triton >= 3.3")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile afresh
    done = subprocess.run([sys.executable, "-m", "mixcon", "bench", "kernel", "--arch", "90", "--dtypes", "fp32,bf16",
                           "--blocks", "32", "--value-blocks", "16,64", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "kernel.json").read_text())["rows"]
    assert [(r["arch"], r["dtype"], r["block"], r["value_block"], r["precision"]) for r in rows] == \
        [("sm_90", "fp32", 32, 16, "ieee"), ("sm_90", "fp32", 32, 64, "ieee"),
         ("sm_90", "bf16", 32, 16, "tf32"), ("sm_90", "bf16", 32, 64, "tf32")]
    assert all(0 < r["registers"] <= 255 and r["spill_stores"] >= 0 and r["shared_KiB"] > 0 for r in rows)


def test_kernel_report_names_the_triton_it_needs(monkeypatch):
    """Triton 3.2 and before have no `get_ptxas`: a clear refusal, not an ImportError from Triton's internals."""
    import types

    from mixcon.benchmarks import kernel

    pytest.importorskip("triton.backends.compiler", reason="triton is not installed")
    monkeypatch.setitem(sys.modules, "triton.backends.nvidia.compiler", types.ModuleType("as in Triton 3.2"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"needs Triton >= 3\.3 \(found 3\."):
        kernel.compile_kernel(90, torch.bfloat16, 32)


@pytest.mark.parametrize("argv,message", [
    (["--blocks", "24"], "powers of two"),
    (["--blocks", "16", "--tau", "20"], ">= --tau"),
    (["--dtypes", "fp8"], "unknown"),
    (["--value-blocks", "8"], "--value-blocks: \\[8\\] must be powers of two"),
])
def test_kernel_report_rejects_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=f"^mixcon bench kernel: .*{message}"):
        main(["bench", "kernel", *argv])


def test_kernel_report_without_triton_names_itself(monkeypatch):
    """Without triton: a SystemExit in the form of the command's other refusals, 'mixcon bench kernel: ...'."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    with pytest.raises(SystemExit, match=r"^mixcon bench kernel: needs triton: pip install 'mixcon\[triton\]'$"):
        main(["bench", "kernel"])


def test_kernel_report_reads_ptxas_figures_and_passes_its_settings(monkeypatch):
    """With Triton's compiler and ptxas faked: the figures of ptxas's report (stores and loads apart), shared memory
    in KiB of 1024 bytes, x, k and q in the run's dtype (the rest fp32), and `run` hands each variant its tau."""
    import types

    from mixcon.benchmarks import kernel

    triton = pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("triton.backends.nvidia.compiler", reason="this triton has no NVIDIA backend")
    import mixcon.ops.triton_chunk as interpreted  # (imported with the interpreter on, as the other tests take it)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a copy of it as Triton's compiler takes it
    spec = importlib.util.spec_from_file_location(interpreted.__name__, interpreted.__file__)
    compiled = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compiled)
    monkeypatch.setitem(sys.modules, interpreted.__name__, compiled)
    sources = []
    monkeypatch.setattr(triton, "compile", lambda source, **kw: sources.append(source) or types.SimpleNamespace(
        asm={"ptx": ""}, metadata=types.SimpleNamespace(shared=3072)))
    report = "ptxas info: Used 96 registers, 16 bytes stack frame, 8 bytes spill stores, 24 bytes spill loads"
    monkeypatch.setattr(kernel, "subprocess", types.SimpleNamespace(run=lambda *a, **kw: types.SimpleNamespace(
        stderr=report)))
    row = kernel.compile_kernel(90, torch.bfloat16, 32)
    assert {k: row[k] for k in ("registers", "stack", "spill_stores", "spill_loads", "shared_KiB")} == dict(
        registers=96, stack=16, spill_stores=8, spill_loads=24, shared_KiB=3.0)
    pointers = {k: v for k, v in sources[0].signature.items() if k.endswith("_ptr")}
    assert {k for k, v in pointers.items() if v == "*bf16"} == {"x_ptr", "k_ptr", "q_ptr"}
    assert {v for k, v in pointers.items() if k not in ("x_ptr", "k_ptr", "q_ptr")} == {"*fp32"}
    taus = []
    monkeypatch.setattr(kernel, "compile_kernel", lambda *args, **kw: taus.append(args[5]) or dict(row))
    kernel.run([90], [torch.bfloat16], [32], 64, 64, 3, None)
    assert taus == [3]
