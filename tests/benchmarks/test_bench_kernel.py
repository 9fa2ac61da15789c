"""`mixcon.benchmarks.kernel`: the Triton kernel compiled for a GPU without one."""

from __future__ import annotations

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
