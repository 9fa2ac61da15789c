"""`mixcon.benchmarks.matvec`: few-row products, `ops.linear` against `F.linear`."""

from __future__ import annotations

import json

import pytest
import torch

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


def test_matvec_weights_add_up_to_the_megabytes_asked(monkeypatch, tmp_path):
    """Whole `small` decoding steps of weights (~4.3 MiB each), as many as come nearest --megabytes; the
    `ops.linear` forms time `ops.linear` (the other two F.linear)."""
    monkeypatch.setattr(matvec.torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(common, "interleaved_median_seconds", lambda fns, repeats, warmup: {
        name: fn() is not None and 0.01 for name, fn in fns.items()})
    monkeypatch.setattr(matvec, "_plot", lambda rows, path: None)
    calls = []
    monkeypatch.setattr(matvec, "linear", lambda x, w: calls.append(1) or torch.nn.functional.linear(x, w))
    per_step = sum(n * k for n, k in matvec.SMALL_STEP) * 4 / 2**20
    for megabytes, steps in ((9, 2), (21, 5), (1, 1)):
        row = matvec.run([1], megabytes=megabytes, repeats=1, out_dir=tmp_path)[0]
        assert row["F.linear eager GB/s"] == pytest.approx(steps * per_step * 2**20 / 0.01 / 1e9)
        assert json.loads((tmp_path / "matvec.json").read_text())["weight_MiB"] == pytest.approx(steps * per_step)
        assert len(calls) == 2 * steps * len(matvec.SMALL_STEP)  # one chain per ops.linear form
        calls.clear()


def test_matvec_forms_are_timed_in_rounds(monkeypatch):
    """Each form's two warm-ups, then rounds that call every form once: a machine's drift reaches all four alike
    (timed one after the other, a form timed first on a warming machine read as 1.5x slower than its twin)."""
    made: list[int] = []  # the chains built, numbered
    order: list[int] = []  # the chains called

    def chain(weights, product):
        form = len(made)
        made.append(form)
        return lambda x: order.append(form)

    monkeypatch.setattr(matvec, "chain", chain)
    monkeypatch.setattr(matvec.torch, "compile", lambda fn, **kw: fn)
    row = matvec.run([1], megabytes=1, repeats=3, out_dir=None)[0]
    assert made == [0, 1, 2, 3] and order[:8] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [sorted(order[i:i + 4]) for i in (8, 12, 16)] == [[0, 1, 2, 3]] * 3 and len(order) == 20
    assert all(row[f"{form} ms"] > 0 for form in matvec.FORMS)


def test_matvec_chain_keeps_a_part_of_every_product():
    """8 columns of each product in the output, so that a compiler cannot drop any product as unused."""
    weights = [torch.randn(n, k) for n, k in matvec.SMALL_STEP[:3]]
    assert matvec.chain(weights, torch.nn.functional.linear)(torch.randn(2, 256)).shape == (2, 8 * 3)
