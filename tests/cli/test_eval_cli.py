"""`mixcon eval perplexity` on a saved tiny model: the numbers of `evaluate_texts`, JSON, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mixcon import MixConForCausalLM
from mixcon.cli import main
from mixcon.data import ByteTokenizer, Corpus
from mixcon.evaluation import evaluate_texts

TEXTS = ["To be, or not to be, that is the question:\n", "Whether 'tis nobler in the mind to suffer\n" * 3,
         "The slings and arrows of outrageous fortune\n"]


@pytest.fixture
def saved(tmp_path: Path, tiny_model) -> tuple[Path, Path]:
    model = tiny_model(dtype=torch.float32, vocab_size=ByteTokenizer.vocab_size)
    model.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXTS):
        (corpus / f"{i}.txt").write_text(text)
    return tmp_path / "model", corpus


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "perplexity", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--checkpoint", "--corpus", "--max-bytes", "--mode", "--context", "--stride", "--batch-size",
                 "--tokenizer", "--device", "--dtype", "--compile", "--json", "corpus specs"]:
        assert flag in text


@pytest.mark.parametrize("mode", ["window", "stream"])
def test_prints_and_writes_the_scores_of_evaluate_texts(saved, tmp_path, capsys, monkeypatch, mode):
    model_dir, corpus = saved
    out = tmp_path / "new" / "folder" / "eval.json"  # made for it
    args = ["eval", "perplexity", "--checkpoint", str(model_dir), "--tokenizer", "bytes", "--corpus", str(corpus),
            "--mode", mode, "--context", "16", "--batch-size", "2", "--json", str(out), "--no-progress"]
    compiled = []
    monkeypatch.setattr(MixConForCausalLM, "compile_prefill", lambda self: compiled.append(self))
    assert main(args) == 0 and compiled == []
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    docs = list(Corpus.from_spec(str(corpus)).documents())
    want = evaluate_texts(MixConForCausalLM.from_pretrained(model_dir), ByteTokenizer(), docs, context=16, mode=mode)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert (result["documents"], result["tokens"], result["bytes"]) == (3, n_bytes, n_bytes)
    assert result["nll"] == pytest.approx(want.nll, rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-6)
    assert result["mode"] == mode and result["context"] == 16
    assert result["stride"] == (16 if mode == "window" else None)  # a stream has no stride
    assert f"3 documents, {n_bytes:,} tokens" in printed and f"{want.bits_per_byte:.4f} bits/byte" in printed
    assert main([*args, "--compile"]) == 0 and len(compiled) == 1  # its prefill through compiled Conba layers
    assert json.loads(out.read_text())["nll"] == result["nll"]


def test_a_json_file_that_cannot_be_written_ends_in_one_line_after_the_scores(saved, tmp_path, capsys,
                                                                                monkeypatch):
    """A file system that refuses the write only when it happens (output_file's early check passed)."""
    from mixcon.cli import eval as eval_cli

    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(eval_cli, "write_text_atomic", refuse)
    model_dir, corpus = saved
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit, match=rf"mixcon eval perplexity: --json {re.escape(str(out))}: cannot write the "
                                         r"results \(\[Errno 13\] Permission denied"):
        main(["eval", "perplexity", "--checkpoint", str(model_dir), "--tokenizer", "bytes", "--corpus", str(corpus),
              "--context", "16", "--json", str(out), "--no-progress"])
    assert "bits/byte" in capsys.readouterr().out


def test_max_bytes_limits_the_text(saved, tmp_path, capsys):
    model_dir, corpus = saved
    out = tmp_path / "eval.json"
    assert main(["eval", "perplexity", "--checkpoint", str(model_dir), "--tokenizer", "bytes", "--corpus",
                 str(corpus), "--max-bytes", "50", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["bytes"] == 50 and result["documents"] == 2


@pytest.mark.parametrize(("extra", "message"), [
    (["--stride", "32", "--context", "16"], r"--stride 32 must be in \[1, --context 16\]"),
    (["--stride", "8", "--mode", "stream"], r"--stride 8: windows only \(--mode 'window'\)"),
])  # --context 0, --max-bytes 0: argparse refuses them (tests/cli/test_data_cli.py)
def test_bad_arguments_exit_with_the_reason(saved, extra, message):
    """Named by their flags, as given (the messages said stride=32, mode='window')."""
    model_dir, corpus = saved
    with pytest.raises(SystemExit, match=f"^mixcon eval perplexity: {message}"):
        main(["eval", "perplexity", "--checkpoint", str(model_dir), "--tokenizer", "bytes", "--corpus", str(corpus),
              "--no-progress", *extra])


def test_a_corpus_with_no_text_is_an_error_naming_it(saved, tmp_path, capsys):
    model_dir, _ = saved
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "skipped.jsonl").write_text('{"text": ""}\nnot json\n')
    for corpus, named in [("empty.txt", r"text .*empty.txt \(1 file\)"),
                          ("skipped.jsonl", r"JSON Lines .*skipped.jsonl .*; skipped 1 \(.*jsonl:2: not JSON\)")]:
        with pytest.raises(SystemExit, match=f"mixcon eval perplexity: --corpus: empty corpus: no documents in "
                                             f"{named}"):
            main(["eval", "perplexity", "--checkpoint", str(model_dir), "--tokenizer", "bytes",
                  "--corpus", str(tmp_path / corpus), "--no-progress"])
    assert "perplexity" not in capsys.readouterr().out


@pytest.mark.parametrize(("action", "extra", "message"), [
    *[(action, ["--json", "{tmp}"], "argument --json: '{tmp}' is a directory; name a file to write")
      for action in ("perplexity", "tasks")],
    ("perplexity", ["--json", "{tmp}/a.txt/out.json"], "argument --json: '{tmp}/a.txt/out.json': {tmp}/a.txt is not"),
    ("tasks", ["--limit", "-1"], "argument --limit: expected a finite number > 0, got '-1' (a fraction of each task's"),
    ("tasks", ["--limit", "0"], "argument --limit: expected a finite number > 0, got '0'"),
    ("tasks", ["--limit", "nan"], "argument --limit: expected a finite number > 0, got 'nan'"),
    ("tasks", ["--num-fewshot", "-1"], "argument --num-fewshot: expected an integer >= 0, got '-1'"),
    ("tasks", ["--seed", str(2**32)], "argument --seed: expected an integer in [0, 4294967295]"),  # numpy's seeds
])
def test_bad_options_are_usage_errors_before_any_work(tmp_path, capsys, action, extra, message):
    (tmp_path / "a.txt").write_text("")
    argv = ["eval", action, "--checkpoint", str(tmp_path / "nothing"), *[x.format(tmp=tmp_path) for x in extra]]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--tasks", "t"] if action == "tasks" else argv)
    assert exit_info.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err


def test_a_missing_checkpoint_is_a_clear_error(tmp_path, saved):
    _, corpus = saved
    with pytest.raises(SystemExit, match=r"mixcon eval perplexity: .*nothing"):
        main(["eval", "perplexity", "--checkpoint", str(tmp_path / "nothing"), "--corpus", str(corpus)])


def test_eval_tasks_hands_its_options_to_the_adapter(saved, monkeypatch):
    """--max-length, --context, --batch-size, --seed and --compile reach MixConLM, --num-fewshot, --limit and the seed
    the harness's simple_evaluate (adapter, task index and harness stubbed: no harness run)."""
    pytest.importorskip("lm_eval", reason="the lm-eval harness is not installed (pip install 'mixcon[eval]')")
    import lm_eval
    import lm_eval.tasks

    import mixcon.integrations.lm_eval as adapter

    class Stop(Exception):
        pass

    given, evaluated = {}, {}

    def record(checkpoint, **kwargs):
        given.update(kwargs)
        return "lm"

    class Tasks:  # the harness's task index, stubbed: every name is a task
        def __init__(self, include_path=None):
            pass

        def match_tasks(self, names):
            return names

    def evaluate(**kwargs):
        evaluated.update(kwargs)
        raise Stop

    monkeypatch.setattr(adapter, "MixConLM", record)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Tasks)
    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate)
    model, _ = saved
    with pytest.raises(Stop):
        main(["eval", "tasks", "--checkpoint", str(model), "--tokenizer", "bytes", "--tasks", "x, y", "--max-length",
              "64", "--context", "32", "--batch-size", "5", "--seed", "7", "--compile", "--num-fewshot", "3",
              "--limit", "0.5"])
    assert (given["max_length"], given["context"], given["batch_size"], given["seed"], given["compile"]) == (
        64, 32, 5, 7, True)
    assert {k: evaluated[k] for k in ("model", "tasks", "num_fewshot", "limit", "random_seed", "numpy_random_seed",
                                      "torch_random_seed", "fewshot_random_seed")} == dict(
        model="lm", tasks=["x", "y"], num_fewshot=3, limit=0.5, random_seed=7, numpy_random_seed=7,
        torch_random_seed=7, fewshot_random_seed=7)


def test_a_glob_corpus_leaves_out_the_results_file_it_holds(saved, tmp_path, capsys):
    """--json inside the corpus: a second run scores the same documents, not the first run's JSON as well."""
    model_dir, corpus = saved
    args = ["eval", "perplexity", "--checkpoint", str(model_dir), "--tokenizer", "bytes", "--corpus", f"{corpus}/**",
            "--context", "16", "--json", str(corpus / "results.json"), "--no-progress"]
    results = []
    for _ in range(2):
        assert main(args) == 0
        results.append(json.loads((corpus / "results.json").read_text()))
    assert results[0]["documents"] == results[1]["documents"] == 3 and results[0]["nll"] == results[1]["nll"]


def perplexity_options(saved, monkeypatch, *flags: str) -> dict:
    """What `mixcon eval perplexity` with `flags` calls evaluate_texts with (its keywords and the model's dtype), the
    command stopped there."""
    from mixcon.cli import eval as eval_cli

    class Stop(Exception):
        pass

    given = {}

    def record(model, tok, texts, **kwargs):
        given.update(kwargs, dtype=model.embed.weight.dtype)
        raise Stop

    monkeypatch.setattr(eval_cli, "evaluate_texts", record)
    model_dir, corpus = saved
    with pytest.raises(Stop):
        main(["eval", "perplexity", "--checkpoint", str(model_dir), "--tokenizer", "bytes", "--corpus", str(corpus),
              *flags])
    return given


def test_eval_perplexity_hands_its_options_to_evaluate_texts(saved, monkeypatch):
    given = perplexity_options(saved, monkeypatch, "--context", "16", "--stride", "8", "--batch-size", "3",
                               "--no-progress")
    assert given == dict(context=16, stride=8, mode="window", batch_size=3, progress=False, dtype=torch.float32)


def test_eval_perplexity_defaults_reach_evaluate_texts(saved, monkeypatch):
    """Without options: --context 1024, disjoint windows, batches of 8, a progress bar, and an fp32 model, as --help
    says."""
    given = perplexity_options(saved, monkeypatch)
    assert given == dict(context=1024, stride=None, mode="window", batch_size=8, progress=True, dtype=torch.float32)


def test_dtype_reaches_the_model_and_the_json(saved, tmp_path):
    """--dtype bf16: the scores of the model in bf16 (not of the fp32 weights as saved), and "dtype": "bf16" in the
    JSON."""
    from mixcon.training.checkpoint import load_model_and_tokenizer

    model_dir, corpus = saved
    out = tmp_path / "eval.json"
    assert main(["eval", "perplexity", "--checkpoint", str(model_dir), "--tokenizer", "bytes", "--corpus", str(corpus),
                 "--dtype", "bf16", "--context", "16", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    docs = list(Corpus.from_spec(str(corpus)).documents())
    model, tok = load_model_and_tokenizer(model_dir, "cpu", "bytes", torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    want = evaluate_texts(model, tok, docs, context=16)
    fp32 = evaluate_texts(MixConForCausalLM.from_pretrained(model_dir), ByteTokenizer(), docs, context=16)
    assert result["dtype"] == "bf16" and result["nll"] == pytest.approx(want.nll, rel=1e-6)
    assert result["nll"] != pytest.approx(fp32.nll, rel=1e-6)
