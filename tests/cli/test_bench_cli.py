"""`mixcon bench`: every benchmark's command line (argument checks, help, errors)."""

from __future__ import annotations

import importlib
import re

import pytest
import torch

from mixcon.cli import build_parser, main


@pytest.mark.parametrize("argv,flag,allowed", [
    (["speed", "--lengths", "abc"], "--lengths", "comma-separated integers >= 1"),
    (["speed", "--lengths", "512,0"], "--lengths", "comma-separated integers >= 1"),
    (["speed", "--batches", "0"], "--batches", "comma-separated integers >= 1"),
    (["speed", "--repeats", "0"], "--repeats", "an integer >= 1"),
    (["speed", "--reference-max-T", "-1"], "--reference-max-T", "an integer >= 0"),
    (["speed", "--train-step", "0x512"], "--train-step", "BxT of integers >= 1"),
    (["scan", "--lengths", "2k"], "--lengths", "comma-separated integers >= 1"),
    (["scan", "--batches", "0"], "--batches", "comma-separated integers >= 1"),
    (["scan", "--chunks", "0"], "--chunks", "comma-separated integers >= 1"),
    (["scan", "--heads", "0"], "--heads", "an integer >= 1"),
    (["scan", "--head-dim", "0"], "--head-dim", "an integer >= 1"),
    (["scan", "--state", "0"], "--state", "an integer >= 1"),
    (["scan", "--groups", "0"], "--groups", "an integer >= 1"),
    (["scan", "--repeats", "0"], "--repeats", "an integer >= 1"),
    (["decode", "--contexts", "abc"], "--contexts", "comma-separated integers >= 1"),
    (["decode", "--contexts", "0"], "--contexts", "comma-separated integers >= 1"),
    (["decode", "--new-tokens", "0"], "--new-tokens", "an integer >= 1"),
    (["decode", "--repeats", "0"], "--repeats", "an integer >= 1"),
    (["decode", "--hf-max-context", "-1"], "--hf-max-context", "an integer >= 0"),
    (["matvec", "--rows", "abc"], "--rows", "comma-separated integers >= 1"),
    (["matvec", "--rows", "0"], "--rows", "comma-separated integers >= 1"),
    (["matvec", "--megabytes", "0"], "--megabytes", "an integer >= 1"),
    (["matvec", "--repeats", "0"], "--repeats", "an integer >= 1"),
    (["kernel", "--arch", "h100"], "--arch", "comma-separated integers >= 1"),
    (["kernel", "--arch", "80,1"], "--arch", "comma-separated compute capabilities among 75, 80, 86"),  # not a GPU's
    (["kernel", "--blocks", "x"], "--blocks", "comma-separated integers >= 1"),
    (["kernel", "--head-dim", "0"], "--head-dim", "an integer >= 1"),
    (["kernel", "--tau", "-1"], "--tau", "an integer >= 0"),
    (["recall", "--pairs", "two"], "--pairs", "comma-separated integers >= 1"),
    (["recall", "--pairs", "0,2"], "--pairs", "comma-separated integers >= 1"),
    (["recall", "--sequences", "0"], "--sequences", "an integer >= 1"),
    (["recall", "--seq-len", "0"], "--seq-len", "an integer >= 4"),  # (not blamed on --pairs)
    (["recall", "--vocab", "2"], "--vocab", "an integer >= 3"),
    (["recall", "--steps", "0"], "--steps", "an integer >= 1"),
    (["recall", "--batch-size", "0"], "--batch-size", "an integer >= 1"),
    (["recall", "--lr", "nan"], "--lr", "a finite number > 0"),
    (["filler", "--real-len", "1"], "--real-len", "an integer >= 2"),
    (["filler", "--eval-windows", "0"], "--eval-windows", "an integer >= 1"),
    (["filler", "--lr", "0"], "--lr", "a finite number > 0"),
    (["ablate", "--seeds", "x"], "--seeds", "comma-separated integers in [0, 18446744073709551614], got 'x'"),
    (["ablate", "--seeds", "0,-1"], "--seeds", "comma-separated integers in [0, 18446744073709551614]"),
    (["ablate", "--seeds", str(2**64 - 1)], "--seeds", "comma-separated integers in [0, 18446744073709551614]"),
    (["ablate", "--real-len", "1"], "--real-len", "an integer >= 2"),
    (["ablate", "--steps", "0"], "--steps", "an integer >= 1"),
    (["recall", "--seed", "-1"], "--seed", "an integer in [0, 18446744073709551614], got '-1'"),
    (["filler", "--seed", "1.5"], "--seed", "an integer in [0, 18446744073709551614]"),
])
def test_every_benchmark_rejects_bad_sizes_and_lists_before_any_work(argv, flag, allowed, capsys):
    """A usage error naming the flag and what it allows (exit 2), from argparse: nothing runs."""
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    assert f"mixcon bench {argv[0]}: error: argument {flag}: expected {allowed}" in capsys.readouterr().err


@pytest.mark.parametrize("bench", ["speed", "decode", "recall", "filler", "ablate", "matvec", "scan", "kernel"])
def test_benchmark_help_says_where_results_go(bench, capsys):
    with pytest.raises(SystemExit):
        main(["bench", bench, "--help"])
    written = "docs/bench" if bench not in ("scan", "kernel") else "none, nothing written"
    assert f"(default: {written})" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("bench", ["recall", "filler", "ablate"])
def test_an_error_inside_a_training_benchmark_keeps_its_traceback(bench, small_corpus, tmp_path, monkeypatch):
    """Only argument errors become one-line exits: a ValueError raised while running (a bug) propagates."""
    from mixcon.benchmarks import bytes_lm, recall

    def broken(*args, **kwargs):
        raise ValueError("a bug deep inside")

    module, trainer = (recall, "train_on_recall") if bench == "recall" else (bytes_lm, "train_and_score")
    monkeypatch.setattr(module, trainer, broken)
    argv = {"recall": ["--pairs", "2", "--seq-len", "16", "--vocab", "16"],
            "filler": ["--corpus", str(small_corpus), "--ratios", "0", "--real-len", "8", "--eval-windows", "5"],
            "ablate": ["--corpus", str(small_corpus), "--real-len", "8", "--eval-windows", "5", "--seeds", "0"]}[bench]
    with pytest.raises(ValueError, match="a bug deep inside"):
        main(["bench", bench, "--set", "d_model=16", "--steps", "1", *argv, "--out", str(tmp_path / "out")])


def test_resume_without_an_earlier_run_says_where_it_looked(tmp_path, monkeypatch):
    from mixcon.benchmarks import recall

    monkeypatch.setattr(recall, "train_on_recall", lambda *a, **kw: pytest.fail("trained with nothing to resume"))
    looked = re.escape(str(tmp_path))
    with pytest.raises(SystemExit, match=f"mixcon bench recall: --resume: no earlier run in {looked} "):
        main(["bench", "recall", "--set", "d_model=16", "--pairs", "2", "--seq-len", "16", "--vocab", "16",
              "--out", str(tmp_path), "--resume"])


def test_a_config_error_names_the_bench():
    with pytest.raises(SystemExit, match=r"^mixcon bench decode: --set 'nope=1': unknown config field 'nope'"):
        main(["bench", "decode", "--set", "nope=1"])


@pytest.mark.parametrize("bench", ["filler", "ablate"])
def test_a_glob_corpus_leaves_out_the_results_it_holds(bench, tmp_path, monkeypatch):
    """--out inside a glob --corpus: the stream is the corpus's text, not an earlier run's JSON beside it."""
    import importlib

    module = importlib.import_module(f"mixcon.benchmarks.{bench}")
    (tmp_path / "a.txt").write_text("x" * 500)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{bench}.json").write_text("{}" * 100)  # an earlier run's results
    streams = []
    monkeypatch.setattr(module, "run", lambda *args, **kwargs: streams.extend(
        a for a in args if isinstance(a, torch.Tensor)))
    assert main(["bench", bench, "--corpus", f"{tmp_path}/**", "--out", str(tmp_path / "out"), "--eval-windows", "2",
                 "--real-len", "8"]) == 0
    assert [s.numel() for s in streams] == [501]  # the 500 bytes and an EOS


@pytest.mark.parametrize("bench", ["recall", "filler", "ablate", "speed"])
def test_benchmark_help_gives_its_docstring_the_studies_with_their_lines_as_written(bench, capsys):
    module = importlib.import_module(f"mixcon.benchmarks.{bench}")
    with pytest.raises(SystemExit):
        main(["bench", bench, "--help"])
    out = capsys.readouterr().out
    lines = [line for line in module.__doc__.strip().splitlines() if line.strip()]
    assert " ".join(lines[0].split()) in " ".join(out.split())  # the docstring, not the one-line summary
    kept = all(line in out.splitlines() for line in lines)  # each line as written (tables of options)
    assert kept == (bench != "speed")  # the studies keep theirs; the others are reflowed


def test_bench_help_lists_each_benchmark_with_its_summary(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    for line in ("speed Conba layer vs transformers' Mamba2 vs the reference loop",
                 "scan the Conba scan alone vs its roofline: PyTorch chunked form, Triton kernel",
                 "decode generation latency and cache memory vs context length",
                 "recall associative recall: MixCon vs its Transformer and Conba twins, trained",
                 "filler uninformative tokens: MixCon vs its twins on text with fillers inserted",
                 "ablate ablations: variants of a model trained on the same bytes, over seeds",
                 "matvec few-row products (decoding): ops.linear vs F.linear",
                 "kernel registers and spills of the Triton scan kernel, compiled for GPUs"):
        assert line in out


@pytest.mark.parametrize("bench,config", [("decode", "small"), ("recall", "tiny"), ("filler", "tiny"),
                                          ("ablate", "tiny")])
def test_benchmark_config_defaults(bench, config, capsys):
    """decode times the `small` preset by default; the studies train `tiny` (README, --help)."""
    assert build_parser().parse_args(["bench", bench]).config == config
    with pytest.raises(SystemExit):
        main(["bench", bench, "--help"])
    assert f"(default: {config})" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("bench", ["speed", "scan", "matvec", "kernel"])
def test_benchmarks_that_build_no_model_of_the_config_refuse_its_flags(bench, capsys, monkeypatch):
    """--config / --set belong to the benchmarks that build their models from them: elsewhere they would be
    ignored, so they are a usage error."""
    monkeypatch.setattr(importlib.import_module(f"mixcon.benchmarks.{bench}"), "main", lambda *a, **kw: 0)
    with pytest.raises(SystemExit) as e:
        main(["bench", bench, "--config", "tiny"])
    assert e.value.code == 2 and "unrecognized arguments: --config tiny" in capsys.readouterr().err
