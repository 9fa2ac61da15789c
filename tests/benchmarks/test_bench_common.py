"""`mixcon.benchmarks.common`: timing, peaks and bandwidths, memory, twins, and resuming a benchmark's runs."""

from __future__ import annotations

import json
import sys
import weakref

import pytest
import torch

from mixcon.benchmarks import common
from mixcon.benchmarks.common import SavedBytes
from mixcon.cli import main
from mixcon.config import MixConConfig


def test_interleaved_timing_alternates_the_order_of_each_round():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = common.interleaved_median_seconds(fns, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")
    assert set(medians) == set("abc") and all(m >= 0 for m in medians.values())


def test_interleaved_timing_leaves_out_what_raises_the_errors_it_is_told():
    calls = []

    def b():
        calls.append("b")
        if calls.count("b") == 2:  # its warm-up passes, its first timed call fails
            raise torch.OutOfMemoryError("no room")
    medians = common.interleaved_median_seconds({"a": lambda: calls.append("a"), "b": b}, repeats=3, warmup=1,
                                                dropped_on=(torch.OutOfMemoryError,))
    assert set(medians) == {"a"} and calls == ["a", "b", "a", "b", "a", "a"]
    with pytest.raises(ValueError):  # anything else propagates
        common.interleaved_median_seconds({"c": lambda: int("c")}, dropped_on=(torch.OutOfMemoryError,))


def test_the_matmul_peak_and_the_copy_bandwidth_from_their_timings(monkeypatch):
    """The peak from the fastest of the repeats (2 n^3 FLOP each); a copy moves its bytes twice (read, write)."""
    monkeypatch.setattr(common, "wall_times", lambda fn, repeats, warmup: [0.5, 0.25, 0.4])
    assert common.matmul_peak_gflops(n=64) == pytest.approx(2 * 64**3 / 0.25 / 1e9)
    # fp16 on a CPU at n <= 512
    assert common.matmul_peak_gflops(n=2048, dtype=torch.float16) == pytest.approx(2 * 512**3 / 0.25 / 1e9)
    monkeypatch.setattr(common, "median_seconds", lambda fn, repeats, warmup: 0.5)
    assert common.copy_bandwidth_gbs(mbytes=1) == pytest.approx(2 * 2**20 / 0.5 / 1e9)
    assert common.stream_read_gbs(mbytes=1) == pytest.approx(2**20 / 0.5 / 1e9)  # a sum reads its bytes once


def test_a_results_machine_records_the_environment_that_changes_timings(monkeypatch):
    """glibc's allocator settings alone moved a layer's fwd+bwd 1.2-1.9x (docs/benchmarks.md §38): a result names
    those of `TIMING_ENVIRONMENT` that are set, and nothing else of the environment."""
    for name in common.TIMING_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MIXCON_UNRELATED", "x")
    assert common.machine()["environment"] == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "OMP_NUM_THREADS": "2"}
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert common.machine()["environment"] == {}


def test_twins_of_a_model_with_a_layer_pattern_are_pure():
    base = MixConConfig.preset("tiny", layer_pattern="ACCC", conba_per_block=3)
    assert {name: c.layout_string() for name, c in common.twins(base).items()} == {
        "mixcon": "ACCC/DMDM | ACCC/DMDM", "transformer-twin": "AAAA/DMDM | AAAA/DMDM",
        "conba-twin": "CCCC/DMDM | CCCC/DMDM"}


def test_timings_are_medians_and_memory_is_counted_in_kib_of_1024_bytes(monkeypatch):
    times = iter([6.0, 1.0, 2.0])  # median 2, mean 3
    monkeypatch.setattr(common, "seconds_of", lambda fn: next(times))
    assert common.interleaved_median_seconds({"a": lambda: None}, repeats=3, warmup=0) == {"a": 2.0}
    if not sys.platform.startswith("linux"):
        pytest.skip("peak_memory reads /proc/self/status (Linux)")
    monkeypatch.setattr(common, "_status_kib", lambda key: {"VmRSS": 100, "VmHWM": 150}[key])
    assert common.peak_memory(lambda: None, "cpu") == 50 * 1024


def test_wall_times_leave_out_the_warm_up_and_median_seconds_is_their_median(monkeypatch):
    """Warm-up calls run untimed, then `repeats` timed calls (more while their total is under min_seconds)."""
    warm, times = [], iter([6.0, 1.0, 2.0, 0.1, 0.1, 0.1, 0.1])
    monkeypatch.setattr(common, "seconds_of", lambda fn: next(times))
    assert common.median_seconds(lambda: warm.append(1), repeats=3, warmup=2) == 2.0 and len(warm) == 2
    assert common.wall_times(lambda: None, repeats=1, warmup=0, min_seconds=0.25) == [0.1, 0.1, 0.1]


def test_peak_memory_on_cuda_is_the_allocators_peak_above_what_was_allocated_before(monkeypatch):
    """On a fake CUDA allocator holding 100 bytes after an earlier peak of 400: a call that peaks at 250 held 150."""
    held = {"now": 100, "peak": 400}
    monkeypatch.setattr(common, "sync", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: held.update(peak=held["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: held["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: held["peak"])
    assert common.peak_memory(lambda: held.update(peak=max(held["peak"], 250)), "cuda") == 150


def test_resume_refuses_results_written_without_a_setting(tmp_path):
    """A results file that lacks one of the settings (an older version's, or another benchmark's) is not taken as
    written with them."""
    (tmp_path / "probe.json").write_text(json.dumps({"steps": 4, "rows": []}))
    assert common.finished_runs(tmp_path, "probe", {"steps": 4}, key=("model",)) == {}
    with pytest.raises(common.UsageError, match=r"was written with other seed"):
        common.finished_runs(tmp_path, "probe", {"steps": 4, "seed": 0}, key=("model",))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_peak_memory_is_what_a_call_holds_at_most_above_before():
    held = torch.ones(16 * 2**18)  # 16 MiB in use before: not counted

    def transient(mib: int) -> None:
        a = torch.ones(mib * 2**18)  # touched: resident
        b = torch.ones(mib * 2**18)
        del a, b

    peak = common.peak_memory(lambda: transient(32), "cpu")
    assert 60 * 2**20 <= peak <= 72 * 2**20  # both 32 MiB tensors at once, nothing of `held`
    assert common.peak_memory(lambda: None, "cpu") < 4 * 2**20
    assert held.sum() > 0


def test_saved_bytes_counter_frees_what_it_counted():
    """Counting saved activations must not keep the counted graph alive (a leak of GBs at T = 8192)."""
    x = torch.randn(100, requires_grad=True)
    with SavedBytes() as counter:
        y = x.exp()  # exp saves its own output for backward
    assert counter.nbytes == y.nbytes
    ref = weakref.ref(y)
    del y
    assert ref() is None
    w = torch.randn(100, 50, requires_grad=True)
    with SavedBytes(x, w) as counter:
        z = (x @ w).exp()  # the product saves x and w (held, not counted), exp its output (counted)
    assert counter.nbytes == z.nbytes


def test_saved_bytes_count_each_storage_once_and_whole():
    """A tensor saved twice counts once; a saved view counts the whole storage it keeps alive."""
    x = torch.randn(100, requires_grad=True)
    with SavedBytes() as counter:
        y = x.exp()  # saves y
        y * y  # saves y twice more
    assert counter.nbytes == y.nbytes
    with SavedBytes() as counter:
        b = x * 2  # saves no tensor
        b[:10].sin()  # saves a view of 10 of b's 100 elements
    assert counter.nbytes == b.nbytes


@pytest.mark.parametrize("bench", ["filler", "recall"])
def test_filler_and_recall_benchmarks_resume_an_interrupted_run_exactly(bench, small_corpus, tmp_path, monkeypatch):
    from mixcon.benchmarks import bytes_lm, recall

    if bench == "filler":
        argv = ["bench", "filler", "--set", "d_model=16", "--corpus", str(small_corpus), "--ratios", "0,1",
                "--real-len", "8", "--steps", "2", "--batch-size", "3", "--eval-windows", "5"]
        module, trainer, runs = bytes_lm, "train_and_score", 6  # 3 twins x 2 ratios
    else:
        argv = ["bench", "recall", "--set", "d_model=16", "--pairs", "2,4", "--seq-len", "16", "--vocab", "16",
                "--steps", "2", "--batch-size", "4", "--sequences", "6"]
        module, trainer, runs = recall, "train_on_recall", 3  # 3 twins
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / f"{bench}.json").read_text())

    trained, interrupt = [], True
    train = getattr(module, trainer)

    def counted(*args, **kwargs):  # and, while `interrupt`, Ctrl-C in the last but one run
        if interrupt and len(trained) == runs - 2:
            raise KeyboardInterrupt
        trained.append(kwargs["seed"])
        return train(*args, **kwargs)

    monkeypatch.setattr(module, trainer, counted)
    out = ["--out", str(tmp_path / "cut")]
    assert main([*argv, *out]) == 130  # Ctrl-C: the command stops quietly
    def timeless(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "train_s"} for r in rows]

    partial = json.loads((tmp_path / "cut" / f"{bench}.json").read_text())
    assert timeless(partial["rows"]) == timeless(whole["rows"][:runs - 2])
    assert not (tmp_path / "cut" / f"{bench}.png").exists()

    with pytest.raises(SystemExit, match=rf"mixcon bench {bench}: --resume: .* was written with other steps"):
        main([*argv, *out, "--resume", "--steps", "3"])
    trained, interrupt = [], False
    assert main([*argv, *out, "--resume"]) == 0
    assert len(trained) == 2  # only the runs the interruption left
    resumed = json.loads((tmp_path / "cut" / f"{bench}.json").read_text())
    assert timeless(resumed["rows"]) == timeless(whole["rows"])
    assert (tmp_path / "cut" / f"{bench}.png").stat().st_size > 0
    trained = []  # fewer models than the saved run: theirs are reused, nothing trains, and none is dropped
    assert main([*argv, *out, "--resume", "--models", "conba-twin,mixcon"]) == 0 and trained == []
    kept = json.loads((tmp_path / "cut" / f"{bench}.json").read_text())["rows"]
    assert sorted(timeless(kept), key=repr) == sorted(timeless(whole["rows"]), key=repr)


@pytest.mark.parametrize("bench", ["filler", "ablate"])
def test_filler_and_ablate_results_record_every_setting_a_resume_must_match(bench, tmp_path, monkeypatch):
    from mixcon.benchmarks import ablate, bytes_lm, filler

    def fake_score(config, train, held_out, *, ratio, steps, batch_size, lr, seed, device):
        """`bytes_lm.train_and_score` without training: a score from the seed and the ratio."""
        return dict(layout=config.layout_string(), params=1, active_params=1, train_s=0.0, final_loss=1.0,
                    bits_per_byte=8.0 + seed / 100 + ratio)

    monkeypatch.setattr(bytes_lm, "train_and_score", fake_score)
    stream = torch.arange(400) % 200
    base = MixConConfig.preset("tiny", d_model=16)
    settings = dict(real_len=8, steps=1, batch_size=2, lr=1e-3, eval_windows=5, out_dir=tmp_path)
    if bench == "filler":
        def go(resume=False, **change):
            return filler.run(base, stream, [0.0], seed=3, models=["mixcon"], resume=resume, **(settings | change))
    else:
        def go(resume=False, **change):
            return ablate.run(base, {"no-control": dict(conba_control=False)}, stream, [3], resume=resume,
                              **(settings | change))
    go()
    payload = json.loads((tmp_path / f"{bench}.json").read_text())
    assert {k: payload[k] for k in ("real_len", "steps", "batch_size", "lr", "eval_windows")} == {
        k: v for k, v in settings.items() if k != "out_dir"}
    assert payload["base"] == base.to_dict() and payload["bytes"] == 400
    for field, value in (("real_len", 9), ("eval_windows", 4), ("batch_size", 3)):
        with pytest.raises(common.UsageError, match=rf"was written with other {field}"):
            go(resume=True, **{field: value})
