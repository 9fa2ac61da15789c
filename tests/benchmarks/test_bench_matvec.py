"""`mixcon.benchmarks.matvec`: few-row products, `ops.linear` against `F.linear`."""

from __future__ import annotations

import pytest

from mixcon.benchmarks import common, matvec


def test_matvec_benchmark_times_four_forms(tmp_path, have_c_compiler):
    if not have_c_compiler:
        pytest.skip("torch.compile's CPU backend needs a C/C++ compiler")
    rows = matvec.run([2], megabytes=1, repeats=1, out_dir=tmp_path)
    assert [r["rows"] for r in rows] == [2]
    assert all(rows[0][f"{form} GB/s"] > 0 for form in matvec.FORMS)
    assert "ops.linear eager GB/s" in rows[0]
    assert rows[0]["speed-up"] == rows[0]["F.linear compiled ms"] / rows[0]["ops.linear compiled ms"]
    assert (tmp_path / "matvec.png").stat().st_size > 0


def test_matvec_weights_add_up_to_the_megabytes_asked(monkeypatch):
    """Whole `small` decoding steps of weights (~4.3 MiB each), as many as come nearest --megabytes."""
    monkeypatch.setattr(matvec.torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(common, "median_seconds", lambda fn, repeats, warmup: fn() is not None and 0.01)
    per_step = sum(n * k for n, k in matvec.SMALL_STEP) * 4 / 2**20
    for megabytes, steps in ((9, 2), (21, 5), (1, 1)):
        row = matvec.run([1], megabytes=megabytes, repeats=1, out_dir=None)[0]
        assert row["F.linear eager GB/s"] == pytest.approx(steps * per_step * 2**20 / 0.01 / 1e9)
