"""`mixcon.benchmarks.scan`: the scan alone against its roofline."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys

import pytest
import torch

import mixcon
from mixcon.benchmarks import common, scan, speed
from mixcon.cli import main
from mixcon.ops import conba_scan

SCAN_SHAPE = dict(heads=4, head_dim=8, state=8, groups=2)


def test_scan_benchmark_rows_against_the_roofline(tmp_path):
    rows = scan.run([40], [2], repeats=1, out_dir=tmp_path, chunks=(16, 32), triton=False, **SCAN_SHAPE)
    assert [(r["variant"], r["form"]) for r in rows] == [(v, f"torch c{c}") for v in scan.VARIANTS for c in (16, 32)]
    assert all(r["ms"] > 0 and r["gflops"] > 0 and r["gbs"] > 0 and r["x_roofline"] > 0 for r in rows)
    # the forms compute one function: each chunk length against the first
    assert all(r["max_err"] == 0 if r["form"] == "torch c16" else r["max_err"] < 1e-5 for r in rows)
    flops = speed.scan_flops(2, 40, 4, 8, 8, 32, True, 2, G=2)
    control = next(r for r in rows if (r["variant"], r["form"]) == ("control-tau2", "torch c32"))
    assert control["gflops"] == pytest.approx(flops / control["ms"] * 1e3 / 1e9)
    assert json.loads((tmp_path / "scan.json").read_text())["rows"] == rows
    assert (tmp_path / "scan.png").stat().st_size > 0


def test_scan_benchmark_times_the_triton_kernel_beside_the_torch_scan():
    """In Triton's interpreter on a CPU: the kernel's rows within its limits (chunks >= 16), equal to torch's."""
    pytest.importorskip("triton", reason="triton is not installed (pip install 'mixcon[triton]')")
    rows = scan.run([40], [1], repeats=1, out_dir=None, chunks=(8, 16), variants=("control-tau2",), triton=True,
                    **SCAN_SHAPE)
    assert [r["form"] for r in rows] == ["torch c8", "torch c16", "triton c16"]
    assert rows[-1]["max_err"] < 1e-4
    rows = scan.run([40], [1], repeats=1, out_dir=None, chunks=(16,), variants=("control-tau2",), triton=True,
                    value_blocks=[64, 16, 32], **dict(SCAN_SHAPE, head_dim=24))  # 64 is 32 at P = 24: once
    assert [r["form"] for r in rows] == ["torch c16", "triton c16 v16", "triton c16 v32"]
    assert all(r["max_err"] < 1e-4 for r in rows)


def test_scan_benchmark_compiled_form(have_c_compiler):
    if not have_c_compiler:
        pytest.skip("torch.compile's CPU backend needs a C compiler")
    rows = scan.run([24], [1], repeats=1, out_dir=None, chunks=(8,), variants=("ssd-tau2",), compiled=True,
                    triton=False, **SCAN_SHAPE)
    assert [r["form"] for r in rows] == ["torch c8", "torch+compile c8"]
    assert rows[-1]["max_err"] < 1e-5


def test_scan_benchmark_command(tmp_path, monkeypatch):
    argv = ["bench", "scan", "--lengths", "24", "--batches", "1", "--heads", "2", "--head-dim", "4", "--state", "4",
            "--groups", "2", "--chunks", "8", "--variants", "ssd,control", "--repeats", "1", "--device", "cpu",
            "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["/usr/bin/mixcon", *argv])  # as the command line would run it
    assert main(argv) == 0
    result = json.loads((tmp_path / "scan.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["ssd", "control"]
    assert (result["heads"], result["head_dim"], result["state"], result["groups"]) == (2, 4, 4, 2)
    assert result["machine"]["argv"] == ["mixcon", *argv]  # the result says what produced it, and with what
    assert result["machine"]["mixcon"].startswith(mixcon.__version__)
    assert result["machine"]["transformers"] == importlib.metadata.version("transformers")
    assert result["machine"]["python"] == platform.python_version() and result["machine"]["cpu"]
    assert result["machine"]["fp32_matmul_precision"] == torch.get_float32_matmul_precision() == "highest"
    try:
        assert main([*argv, "--fp32-precision", "high"]) == 0
        assert json.loads((tmp_path / "scan.json").read_text())["machine"]["fp32_matmul_precision"] == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
    with pytest.raises(SystemExit, match=r"^mixcon bench scan: --variants bogus unknown"):
        main([*argv[:-2], "--variants", "bogus"])
    with pytest.raises(SystemExit, match=r"^mixcon bench scan: --heads 2 must be a multiple of --groups 3"):
        main([*argv, "--groups", "3"])
    with pytest.raises(SystemExit, match=r"--value-blocks \[24\] must be powers of two >= 16"):
        main([*argv, "--value-blocks", "16,24"])
    with pytest.raises(SystemExit, match="--value-blocks times the Triton kernel, which runs here only on CUDA"):
        main([*argv, "--value-blocks", "16"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_benchmark_rows_from_fixed_timings_chunks_and_a_first_form(tmp_path, monkeypatch, dtype):
    """Each `torch cC` row scans with chunk C; errors against the first form; FLOP/s, bytes/s (x, k, q and y in the
    run's dtype, decays, gains and the final state in fp32) and the roofline factor from the shapes, a fixed 10 ms,
    a 100 GFLOP/s peak and a 10 GB/s copy bandwidth."""
    chunks = []

    def scan_spy(*args, chunk_size, **kw):
        chunks.append(chunk_size)
        y, *rest = conba_scan(*args, chunk_size=chunk_size, **kw)
        return (y + (chunk_size == 16), *rest)  # the second form off by one

    monkeypatch.setattr(scan, "conba_scan", scan_spy)
    monkeypatch.setattr(common, "matmul_peak_gflops", lambda **kw: 100.0)
    monkeypatch.setattr(common, "copy_bandwidth_gbs", lambda **kw: 10.0)
    monkeypatch.setattr(common, "interleaved_median_seconds", lambda fns, repeats, warmup: {
        name: fn() and 0.01 for name, fn in fns.items()})
    B, T, H, P, N = 2, 40, 2, 4, 4
    rows = scan.run([T], [B], repeats=1, out_dir=tmp_path, heads=H, head_dim=P, state=N, chunks=(8, 16),
                    variants=("control-tau2",), triton=False, dtype=dtype)
    assert set(chunks) == {8, 16} and [r["form"] for r in rows] == ["torch c8", "torch c16"]
    assert rows[0]["max_err"] == 0 and rows[1]["max_err"] == pytest.approx(1, abs=1e-5 if dtype == torch.float32
                                                                            else 0.1)
    # x in, y out, k, q; decays and gains; the final state
    moved = dtype.itemsize * (2 * B * T * H * P + 2 * B * T * N) + 4 * 2 * B * T * H + 4 * B * H * P * N
    for row, C in zip(rows, (8, 16), strict=True):
        gflops = speed.scan_flops(B, T, H, P, N, C, True, 2) / 0.01 / 1e9
        assert row["gflops"] == pytest.approx(gflops) and row["peak_frac"] == pytest.approx(gflops / 100)
        assert row["gbs"] == pytest.approx(moved / 0.01 / 1e9) and row["bw_frac"] == pytest.approx(row["gbs"] / 10)
        assert row["x_roofline"] == pytest.approx(min(100 / gflops, 10 / row["gbs"]))
    payload = json.loads((tmp_path / "scan.json").read_text())
    assert (payload["matmul_peak_gflops"], payload["copy_gbs"]) == (100.0, 10.0)


def test_scan_benchmark_times_the_forms_of_a_shape_in_rounds(monkeypatch):
    """Each form's first call (its output, for max_err), then its two warm-ups, then rounds that call every form
    once, in alternating order: a machine's drift reaches each form alike."""
    chunks = []

    def scan_spy(*args, chunk_size, **kw):
        chunks.append(chunk_size)
        return conba_scan(*args, chunk_size=chunk_size, **kw)

    monkeypatch.setattr(scan, "conba_scan", scan_spy)
    monkeypatch.setattr(common, "matmul_peak_gflops", lambda **kw: 100.0)
    monkeypatch.setattr(common, "copy_bandwidth_gbs", lambda **kw: 10.0)
    rows = scan.run([40], [1], repeats=3, out_dir=None, heads=2, head_dim=4, state=4, chunks=(8, 16),
                    variants=("ssd",), triton=False)
    assert chunks == [8, 16, 8, 8, 16, 16, 8, 16, 16, 8, 8, 16]
    assert [r["form"] for r in rows] == ["torch c8", "torch c16"] and all(r["ms"] > 0 for r in rows)


@pytest.mark.parametrize("value_blocks,message", [
    ("24", r"--value-blocks \[24\] must be powers of two >= 16"),
    ("16", r"--value-blocks times the Triton kernel, which runs here only on CUDA"),
])
def test_scan_benchmark_value_block_refusals_name_the_command(value_blocks, message, tmp_path):
    with pytest.raises(SystemExit, match=f"^mixcon bench scan: {message}"):
        main(["bench", "scan", "--device", "cpu", "--value-blocks", value_blocks, "--out", str(tmp_path)])
