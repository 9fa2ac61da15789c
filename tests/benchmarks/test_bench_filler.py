"""`mixcon.benchmarks.filler`: bits per byte with uninformative tokens between the real ones."""

from __future__ import annotations

import json

import pytest

from mixcon.cli import main


def test_filler_benchmark_trains_and_scores_each_twin_at_each_ratio(small_corpus, tmp_path):
    argv = ["bench", "filler", "--set", "d_model=16", "--corpus", str(small_corpus), "--ratios", "1.5,0",
            "--real-len", "8", "--steps", "2", "--batch-size", "3", "--eval-windows", "5",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "out" / "filler.json").read_text())
    rows = payload["rows"]
    assert [(r["model"], r["ratio"], r["seq_len"]) for r in rows] == [
        (name, ratio, length) for ratio, length in ((0.0, 8), (1.5, 20))
        for name in ("mixcon", "transformer-twin", "conba-twin")]
    assert all(6 < r["bits_per_byte"] < 10 for r in rows)  # barely trained: near a uniform guess, log2(259) = 8.0
    assert payload["ratios"] == [0.0, 1.5]  # those of the rows, in order
    assert payload["bytes"] == small_corpus.stat().st_size + 1  # every byte and one EOS
    assert (tmp_path / "out" / "filler.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["--ratios", "1,-2"], r"--ratios 1,-2: ratio=-2.0 must be a finite number >= 0"),
    (["--ratios", "inf"], "--ratios inf: ratio=inf must be a finite number >= 0"),
    (["--ratios", "nan"], "--ratios nan: ratio=nan must be a finite number >= 0"),
    (["--ratios", "0,1e30"], r"--ratios 0,1e30: ratio=1e\+30 gives rows of 6.4e\+31 tokens, more than"),
    (["--ratios", "one"], "comma-separated numbers"),
    (["--models", "llama"], "unknown llama"),
    (["--max-bytes", "1000", "--eval-windows", "64"], "needs at least 8,192"),
])
def test_filler_benchmark_rejects_bad_arguments(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):  # (--out: a run that is not refused writes there, not in docs/)
        main(["bench", "filler", "--steps", "1", "--out", str(tmp_path), *argv])
