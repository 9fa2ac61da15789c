"""`mixcon train` and `mixcon generate` end to end on a tiny model and corpus."""

from __future__ import annotations

import json
import os
import random
import re
import signal
from pathlib import Path

import pytest
import torch

from mixcon import MixConForCausalLM
from mixcon.cli import main
from mixcon.data import ByteTokenizer, ShardDataset, load_tokenizer
from mixcon.training.checkpoint import list_checkpoints, read_trainer_state
from mixcon.training.distributed import DistEnv
from mixcon.training.metrics import read_metrics
from mixcon.training.trainer import Trainer, TrainOptions


@pytest.mark.parametrize(("command", "flags"), [
    ("train", ["--config", "--set", "--out", "--resume", "--time-budget", "--steps", "--batch-size",
               "--micro-batch-size", "--parallel", "--activation-checkpointing", "--compile", "--precision",
               "--corpus", "--tokenizer", "--max-bytes", "--init-from", "--document-mask", "torchrun"]),
    ("generate", ["--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--greedy",
                  "--dtype", "--compile"]),
])
def test_help(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    missing = [f for f in flags if f not in text]
    assert not missing


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = random.Random(0)
    words = ["the", "king", "said", "to", "his", "queen", "we", "shall", "go", "now", "and", "sing"]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(60)]
        (folder / f"{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_train_sample_generate_and_resume(corpus, tmp_path, capsys, have_c_compiler):
    run = tmp_path / "run"
    args = ["train", "--config", "tiny", "--set", "vocab_size=320", "--corpus", str(corpus), "--val-fraction", "0.2",
            "--steps", "3", "--time-budget", "900", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
            "--eval-batches", "1", "--sample-tokens", "8", "--prompt", "the king", "--no-progress", "--out", str(run)]
    assert main(args) == 0
    out = capsys.readouterr().out
    last = run / "checkpoints" / "step-00000003"
    assert "training a byte-level BPE tokenizer (320 tokens)" in out
    assert "warmup: 20 steps shortened to 2, all but the last of --steps 3\n" in out  # said, not done silently
    assert "sample (8 tokens" in out and "\nthe king" in out
    assert f"checkpoint: {last}" in out and f"loss plot:  {run / 'loss.png'}" in out
    assert (run / "loss.png").is_file()
    tok = load_tokenizer(last / "tokenizer")
    config = json.loads((last / "config.json").read_text())
    assert config["vocab_size"] == tok.vocab_size <= 320 and config["eos_token_id"] == tok.eos_id

    generate = ["generate", "--checkpoint", str(run), "--prompt", "the", "--max-new-tokens", "5", "--greedy"]
    assert main(generate) == 0
    text = capsys.readouterr().out
    assert text.startswith("the")
    if have_c_compiler:
        assert main([*generate, "--compile"]) == 0
        assert capsys.readouterr().out == text
        long = ["generate", "--checkpoint", str(run), "--prompt", "the king " * 30, "--max-new-tokens", "5", "--greedy"]
        assert main(long) == 0
        eager = capsys.readouterr().out
        assert main([*long, "--compile"]) == 0  # a prompt longer than a segment: compiled prefill
        assert capsys.readouterr().out == eager
    assert main([*generate, "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("the")

    with pytest.raises(SystemExit, match=r"already holds a run.*--resume"):
        main(args)
    shards = sorted((p.name, p.stat().st_mtime_ns) for p in (run / "data").iterdir())
    # --set on --resume changes the checkpoint's config, not a preset's: only where the weights stay as they are,
    # refused before any data is prepared, and before the run's saved --steps, all done, would be.
    with pytest.raises(SystemExit, match=r"--resume keeps the model's weights, whose names or shapes these config "
                                         r"changes would alter: d_model: 32 != 64 \(checkpoint != requested\)"):
        main(["train", "--out", str(run), "--resume", "--set", "d_model=64"])
    with pytest.raises(SystemExit, match=r"names or shapes these config changes would alter: tie_embeddings: True != "
                                         r"False"):  # (a tied model's state dict lists lm_head.weight too)
        main(["train", "--out", str(run), "--resume", "--steps", "4", "--set", "tie_embeddings=false"])
    with pytest.raises(SystemExit, match=r"--resume keeps the run's tokenizer \('bpe'\); --tokenizer 'bytes'"):
        main(["train", "--out", str(run), "--resume", "--tokenizer", "bytes"])
    with pytest.raises(SystemExit, match=r"continues on the run's data; --corpus, --seed would change it"):
        main(["train", "--out", str(run), "--resume", "--corpus", str(run / "data"), "--seed", "5"])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (run / "data").iterdir()) == shards  # not rebuilt
    with pytest.raises(SystemExit, match=r"^mixcon train: --micro-batch-size=3 must be a divisor of the per-process "
                       r"batch \(batch_size / world size = 2\)$"):
        main(["train", "--out", str(run), "--resume", "--micro-batch-size", "3"])
    with pytest.raises(SystemExit, match=r"--steps 3: the run resumed from .*step-00000003 is at step 3 already"):
        main(["train", "--out", str(run), "--resume", "--no-progress"])  # its saved steps: nothing left to do

    capsys.readouterr()
    # the run directory named by --resume is the run's --out
    assert main(["train", "--resume", str(run), "--steps", "5", "--sample-tokens", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resume: steps changes from 3 to 5" in out
    assert "resume: time_budget changes from 900.0 to None" in out  # --steps alone: not the old run's budget
    assert re.search(r"^shards .*, reused$", out, re.M)  # the same corpus and tokenizer: not built again
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]
    assert json.loads((run / "checkpoints" / "step-00000005" / "config.json").read_text()) == config

    # Back to an earlier checkpoint: the later ones are the abandoned run's, discarded only with --overwrite.
    back = ["train", "--out", str(run), "--resume", str(run / "checkpoints" / "step-00000003"), "--steps", "4",
            "--sample-tokens", "0", "--no-progress"]
    with pytest.raises(SystemExit, match=r"holds checkpoints after step-00000003 \(step-00000005\); go back to "
                                         r"step-00000003 with --overwrite \(they are deleted\)"):
        main(back)
    assert main([*back, "--overwrite"]) == 0
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003", "step-00000004"]
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "5", "--set", "router_aux_loss_coef=0.02",
                 "--sample-tokens", "0", "--no-progress"]) == 0
    assert "resume: model config router_aux_loss_coef: 0.01 changes to 0.02" in capsys.readouterr().out
    assert json.loads((run / "checkpoints" / "step-00000005" / "config.json").read_text())["router_aux_loss_coef"] \
        == 0.02



def test_overwrite_removes_the_old_run_only_once_the_new_one_is_ready(corpus, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", "tiny", "--tokenizer", "bytes", "--corpus", str(corpus), "--val-fraction", "0.2",
            "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0", "--no-progress",
            "--out", str(run)]
    assert main([*args, "--steps", "2", "--save-every", "1"]) == 0
    for bad, message in ((["--set", "bogus=1"], "bogus"), (["--corpus", str(tmp_path / "missing")], "no such file"),
                         (["--micro-batch-size", "3"], r"--micro-batch-size=3 must be a divisor")):
        with pytest.raises(SystemExit, match=message):
            main([*args, "--overwrite", *bad])
        assert (run / "checkpoints" / "step-00000001").is_dir(), bad
    assert main([*args, "--overwrite"]) == 0  # one step: the old run's step 2 goes with it
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1]
    assert (run / "loss.png").is_file()
    (tmp_path / "file").write_text("not a run")
    with pytest.raises(SystemExit, match=r"--out .*file is a file; give a run directory"):
        main([*args, "--out", str(tmp_path / "file")])


def test_a_run_resumed_from_another_directory_replaces_a_run_in_out_only_with_overwrite(corpus, tmp_path):
    """--out A --resume B continues B's run in A: refused before any work while A holds a run (its checkpoints,
    shards and metrics stay as they were); with --overwrite, or into an empty A, A holds the continued run alone."""
    args = ["train", "--config", "tiny", "--tokenizer", "bytes", "--val-fraction", "0.2", "--batch-size", "2",
            "--seq-len", "16", "--sample-tokens", "0", "--no-progress", "--save-every", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    (tmp_path / "other.txt").write_text((corpus / "00.txt").read_text()[::-1] * 4)  # another corpus: other shards
    assert main([*args, "--corpus", str(tmp_path / "other.txt"), "--steps", "2", "--out", str(a)]) == 0
    assert main([*args, "--corpus", str(corpus), "--steps", "3", "--out", str(b)]) == 0
    def files(run: Path) -> dict[Path, int]:
        return {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files(a)
    fork = ["train", "--out", str(a), "--resume", str(b), "--steps", "4", "--sample-tokens", "0", "--no-progress"]
    with pytest.raises(SystemExit, match=r"continues another run directory's run, and --out .*a already holds a "
                                         r"run \(latest checkpoint step-00000002\); replace it with --overwrite"):
        main(fork)
    assert files(a) == before
    assert main([*fork, "--overwrite"]) == 0
    assert [p.name for p in list_checkpoints(a)] == ["step-00000004"]
    assert [r["step"] for r in read_metrics(a / "metrics.jsonl")] == [4, 4]  # its own history: the new step, val
    assert [p.name for p in list_checkpoints(b)] == ["step-00000002", "step-00000003"]  # keep_last 2: untouched
    assert main(["train", "--out", str(tmp_path / "c"), "--resume", str(b / "checkpoints" / "step-00000002"),
                 "--steps", "3", "--sample-tokens", "0", "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "c" / "metrics.jsonl") if "loss" in r] == [3]


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_a_run_inside_its_glob_corpus_does_not_read_itself(corpus, tmp_path, capsys, tokenizer):
    """--out inside the folder a glob corpus reads: the run's lock file, and on a second run its shards, metrics,
    config (and the BPE it trained), were read as corpus text; the corpus's own files there are read."""
    vocab = ["--set", "vocab_size=300"] if tokenizer == "bpe" else []
    args = ["train", "--config", "tiny", *vocab, "--tokenizer", tokenizer, "--corpus", f"{corpus}/**", "--steps", "1",
            "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0", "--no-progress",
            "--out", str(corpus / "run")]
    assert main(args) == 0
    assert main([*args, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"text {corpus}/** (12 files)") == 2, out
    # Only what a run writes is left out: a corpus file that lies in the run directory is read.
    assert main([*args[:-1], str(corpus), "--corpus", str(corpus / "00.txt"), "--seq-len", "8"]) == 0


def test_a_validation_split_shorter_than_a_sequence_is_reported(corpus, tmp_path, capsys):
    """Exactly one sequence's tokens are one too few: a sequence and its next-token labels take seq_len + 1."""
    assert main(["data", "prepare", "--corpus", str(corpus), "--val-fraction", "0.1", "--out",
                 str(tmp_path / "d")]) == 0
    n = len(ShardDataset(tmp_path / "d").tokens("val"))
    capsys.readouterr()
    assert main(["train", "--config", "tiny", "--tokenizer", "bytes", "--corpus", str(corpus), "--val-fraction",
                 "0.1", "--steps", "1", "--batch-size", "1", "--seq-len", str(n), "--sample-tokens", "0",
                 "--no-progress", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"no validation: the validation split's {n:,} tokens do not fill one sequence of --seq-len {n} + 1" in out
    assert "val_loss" not in json.dumps(read_metrics(tmp_path / "run" / "metrics.jsonl"))

def test_config_file_and_corrupt_checkpoint_refused_by_generate(corpus, tmp_path):
    run, config_file = tmp_path / "run", tmp_path / "model.json"
    config_file.write_text(json.dumps({"preset": "tiny", "d_model": 48}))
    assert main(["train", "--config", str(config_file), "--set", "moe_every=0", "--tokenizer", "bytes",
                 "--corpus", str(corpus), "--val-fraction", "0.2", "--steps", "1", "--batch-size", "2",
                 "--seq-len", "16", "--sample-tokens", "0", "--no-progress", "--out", str(run)]) == 0
    config = json.loads((run / "checkpoints" / "step-00000001" / "config.json").read_text())
    assert (config["d_model"], config["moe_every"], config["vocab_size"]) == (48, 0, 259)
    weights = run / "checkpoints" / "step-00000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(SystemExit, match=r"model\.safetensors: corrupt"):
        main(["generate", "--checkpoint", str(run), "--max-new-tokens", "2"])


def test_init_from_starts_a_new_run_from_a_models_weights(corpus, tmp_path, capsys):
    common = ["--corpus", str(corpus), "--val-fraction", "0.2", "--batch-size", "2", "--seq-len", "16",
              "--eval-batches", "1", "--sample-tokens", "0", "--no-progress"]
    first = tmp_path / "first"
    assert main(["train", "--config", "tiny", "--tokenizer", "bytes", "--steps", "4", "--out", str(first),
                 *common]) == 0
    source = first / "checkpoints" / "step-00000004"
    trained = MixConForCausalLM.from_pretrained(source)

    # At learning rate 0 the new run keeps the weights it starts from, under a config changed by --set.
    still = tmp_path / "still"
    capsys.readouterr()
    assert main(["train", "--init-from", str(first), "--steps", "2", "--lr", "0", "--set", "router_aux_loss_coef=0.05",
                 "--out", str(still), *common]) == 0
    assert f"training from the weights of {source} in {still}" in capsys.readouterr().out
    kept = MixConForCausalLM.from_pretrained(still / "checkpoints" / "step-00000002")
    assert kept.config == trained.config.replace(router_aux_loss_coef=0.05)
    assert kept.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in kept.state_dict().items())
    assert [r["step"] for r in read_metrics(still / "metrics.jsonl") if "loss" in r] == [1, 2]  # a new run

    # A model directory without a tokenizer (named by --tokenizer), trained on: a fresh optimizer at step 1.
    trained.save_pretrained(tmp_path / "model")
    tuned = tmp_path / "tuned"
    assert main(["train", "--init-from", str(tmp_path / "model"), "--tokenizer", "bytes", "--steps", "2",
                 "--out", str(tuned), *common]) == 0
    moved = MixConForCausalLM.from_pretrained(tuned / "checkpoints" / "step-00000002")
    assert not torch.equal(moved.embed.weight, trained.embed.weight)
    assert read_trainer_state(tuned / "checkpoints" / "step-00000002")["step"] == 2
    resume = ["train", "--out", str(tuned), "--resume", "--steps", "3", "--no-progress", "--sample-tokens", "0"]
    assert main(resume) == 0
    assert [r["step"] for r in read_metrics(tuned / "metrics.jsonl") if "loss" in r] == [1, 2, 3]  # resumes as any run


@pytest.mark.parametrize(("argv", "flag", "allowed"), [
    (["--steps", "0"], "--steps", "an integer >= 1"),
    (["--time-budget", "-1"], "--time-budget", "a finite number > 0"),
    (["--max-bytes", "-5"], "--max-bytes", "an integer >= 0"),
    (["--val-fraction", "1"], "--val-fraction", "a finite number in [0, 1)"),
    (["--min-lr-ratio", "nan"], "--min-lr-ratio", "a finite number in [0, 1]"),
    (["--grad-clip", "-1"], "--grad-clip", "a finite number >= 0"),
    (["--warmup-steps", "2.5"], "--warmup-steps", "an integer >= 0"),
    (["--sample-tokens", "-1"], "--sample-tokens", "an integer >= 0"),
])
def test_train_refuses_out_of_range_options_by_flag_before_any_work(tmp_path, argv, flag, allowed, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "run"), *argv])
    assert e.value.code == 2 and f"argument {flag}: expected {allowed}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_time_budget_that_leaves_no_training_step_fails(corpus, tmp_path, monkeypatch, capsys):
    """Refused up front within the sample's reserve (given, or a resumed run's); a budget that preparing the run
    used up ends with an error, not an untrained model's sample passed off as a success."""
    from mixcon.cli import train

    for budget in ("3", "15"):
        with pytest.raises(SystemExit, match=rf"^mixcon train: --time-budget {budget}: its last 15 s are kept for"):
            main(["train", "--time-budget", budget, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    run = ["--config", "tiny", "--tokenizer", "bytes", "--corpus", str(corpus), "--batch-size", "2", "--seq-len", "16",
           "--no-progress"]
    # 14 s: within the sample's reserve, and room for a step of `tiny` however loaded the machine (6 s was not, once)
    assert main(["train", *run, "--time-budget", "14", "--sample-tokens", "0", "--out", str(tmp_path / "short")]) == 0
    with pytest.raises(SystemExit, match=r"^mixcon train: --time-budget 14: its last 15 s are kept for the sample"):
        main(["train", "--out", str(tmp_path / "short"), "--resume"])  # its budget, with a sample this time
    monkeypatch.setattr(train, "SAMPLE_SECONDS", 0.0)  # so that the budget runs out in preparing the run
    assert main(["train", *run, "--time-budget", "0.01", "--out", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "mixcon train: --time-budget 0.01 s ran out before a training step" in out and "sample (" not in out
    assert "continue with --resume and a larger --time-budget" in out
    # resumed, no new step either: a failure too, though the run has steps
    assert main(["train", "--out", str(tmp_path / "short"), "--resume", "--time-budget", "0.01", "--no-progress"]) == 1
    assert "ran out before a training step" in capsys.readouterr().out


def test_train_refuses_config_fields_the_tokenizer_sets(corpus, tmp_path, monkeypatch):
    """Refused before a BPE is trained; vocab_size sizes the BPE of --tokenizer bpe (tested above)."""
    from mixcon.cli import train

    monkeypatch.setattr(train, "train_bpe_tokenizer", lambda *a, **k: pytest.fail("trained first"))
    for tokenizer, field in (("bytes", "vocab_size=100"), ("bytes", "eos_token_id=5"), ("bpe", "pad_token_id=3")):
        with pytest.raises(SystemExit, match=rf"--set {field.split('=')[0]}: the tokenizer sets them; choose the "
                                             r"tokenizer with --tokenizer"):
            main(["train", "--config", "tiny", "--tokenizer", tokenizer, "--corpus", str(corpus), "--set", field,
                  "--steps", "1", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_bad_set_is_refused_naming_the_command(corpus, tmp_path):
    with pytest.raises(SystemExit, match=r"^mixcon train: --set 'nope=1': unknown config field 'nope'"):
        main(["train", "--config", "tiny", "--corpus", str(corpus), "--set", "nope=1", "--out", str(tmp_path / "r")])


def test_the_runs_bpe_learns_from_the_training_split_only(corpus, tmp_path, monkeypatch):
    """Validation text stays new to the tokenizer as to the model (a BPE with its merges would score it better)."""
    from mixcon.cli import train

    seen, real = [], train.train_bpe_tokenizer
    monkeypatch.setattr(train, "train_bpe_tokenizer", lambda docs, vocab: real(seen.extend(docs) or seen, vocab))
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--set", "vocab_size=300", "--corpus", str(corpus), "--val-fraction",
                 "0.25", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0",
                 "--no-progress", "--out", str(run)]) == 0
    texts = {path.read_text() for path in corpus.iterdir()}
    ds = ShardDataset(run / "data")
    assert 0 < ds.index["splits"]["val"]["documents"] and len(seen) == ds.index["splits"]["train"]["documents"]
    assert set(seen) < texts and sum(len(d.encode()) for d in seen) == ds.index["splits"]["train"]["bytes"]


def test_train_refuses_an_empty_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (an empty --out was the current folder's runs/<config>)
    for out in ("", "  "):  # (a blank one too: a folder named by spaces)
        with pytest.raises(SystemExit, match=r"^mixcon train: --out '': give a run directory"):
            main(["train", "--config", "tiny", "--corpus", str(tmp_path / "none"), "--out", out])
    assert not list(tmp_path.iterdir())


def test_train_refuses_a_batch_its_processes_cannot_share_before_preparing_data(corpus, tmp_path):
    with pytest.raises(SystemExit, match=r"--micro-batch-size=2 must be a divisor of the per-process batch"):
        main(["train", "--config", "tiny", "--corpus", str(corpus), "--batch-size", "3", "--micro-batch-size", "2",
              "--steps", "1", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # no tokenizer trained, no shards written


def test_under_torchrun_an_error_names_the_rank_that_met_it(corpus, tmp_path, monkeypatch):
    import mixcon.cli.train as train_cli

    argv = ["train", "--config", "tiny", "--corpus", str(corpus), "--batch-size", "3", "--steps", "1",
            "--out", str(tmp_path / "run")]
    message = "mixcon train: --batch-size=3 must be divisible by the world size 2"
    for rank, code in ((1, f"[rank 1] {message}"), (0, message)):
        monkeypatch.setattr(train_cli, "init_distributed", lambda device, r=rank: DistEnv(rank=r, world_size=2))
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == code


@pytest.mark.parametrize(("extra", "message"), [
    (["--resume"], r"--resume continues a run, --init-from starts a new one"),
    (["--config", "tiny"], r"--init-from takes the model's config"),
    (["--tokenizer", "bpe"], r"--tokenizer bpe would train a new one"),
    (["--set", "d_model=64"], r"model: its weights do not match the model.*wrong shape.*--set may change only"),
    (["--set", "top_k=9"], r"--set: .*top_k"),
])
def test_init_from_refuses_what_cannot_work(tmp_path, tiny_model, extra, message):
    model = tiny_model(dtype=torch.float32, vocab_size=259)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "c.txt").write_text("some text\n" * 50)
    tokenizer = [] if "--tokenizer" in extra else ["--tokenizer", "bytes"]
    with pytest.raises(SystemExit, match=message):
        main(["train", "--init-from", str(tmp_path / "model"), *tokenizer, "--corpus", str(tmp_path / "c.txt"),
              "--val-fraction", "0", "--steps", "1", "--out", str(tmp_path / "run"), *extra])


def test_init_from_with_the_models_own_tokenizer_refuses_a_vocab_size(tmp_path, tiny_model):
    """No --tokenizer: the model's own (bpe is the default for a new run, whose BPE vocab_size sizes)."""
    model = tiny_model(dtype=torch.float32, vocab_size=259)
    model.save_pretrained(tmp_path / "model")
    ByteTokenizer().save(tmp_path / "model" / "tokenizer")
    with pytest.raises(SystemExit, match=r"--set vocab_size: the tokenizer sets them; the vocabulary is --init-from's"):
        main(["train", "--init-from", str(tmp_path / "model"), "--set", "vocab_size=500", "--steps", "1",
              "--out", str(tmp_path / "run")])


def test_init_from_refuses_its_own_run_as_out(tmp_path, tiny_model):
    tiny_model(dtype=torch.float32, vocab_size=259).save_pretrained(tmp_path / "run" / "model")
    with pytest.raises(SystemExit, match=r"lies in --out"):
        main(["train", "--init-from", str(tmp_path / "run" / "model"), "--tokenizer", "bytes", "--steps", "1",
              "--out", str(tmp_path / "run"), "--overwrite"])


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_saves_and_exits_as_the_signal_says(corpus, tmp_path, monkeypatch, capsys, signum, code):
    """Ctrl-C (or a scheduler's SIGTERM) after step 2: a checkpoint of step 2, no sample, and 128 + the signal's
    number, so that `mixcon train ... && mixcon generate ...` stops there."""
    train_step = Trainer.train_step

    def interrupted(self: Trainer) -> dict:
        record = train_step(self)
        if self.step == 2:
            os.kill(os.getpid(), signum)
        return record

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--tokenizer", "bytes", "--corpus", str(corpus), "--val-fraction",
                 "0.2", "--steps", "5", "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "4",
                 "--no-progress", "--out", str(run)]) == code
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]
    out = capsys.readouterr().out
    assert f"stopped by {signal.Signals(signum).name} after 2 steps" in out and "sample (" not in out


def test_a_run_killed_in_its_final_validation_is_finished_by_resume(corpus, tmp_path, monkeypatch, capsys):
    """Killed (SIGKILL: no save) in the final validation after the loop's checkpoint of the last step, which is no
    validation step: --resume with the same --steps validates, saves and samples (it was refused as being at the
    last step already)."""
    class Killed(BaseException):
        pass

    validate = Trainer._validate

    def killed(self: Trainer, *args: object) -> None:
        if self.step == 4 and self.saved_step == 4:
            raise Killed
        validate(self, *args)

    monkeypatch.setattr(Trainer, "_validate", killed)
    run = tmp_path / "run"
    argv = ["train", "--config", "tiny", "--tokenizer", "bytes", "--corpus", str(corpus), "--val-fraction", "0.2",
            "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--save-every", "2", "--eval-every", "3",
            "--eval-batches", "1", "--sample-tokens", "4", "--no-progress", "--out", str(run)]
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.setattr(Trainer, "_validate", validate)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "sample (4 tokens" in capsys.readouterr().out
    assert read_trainer_state(run)["last_val"]["step"] == 4
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r] == [0, 3, 4]


def test_a_single_text_file_trains_with_validation_by_default(tmp_path, capsys):
    """The commonest first run: one text file and the default --val-fraction (its end validates); with
    --no-progress, no progress bar at all (the data preparation's printed some)."""
    (tmp_path / "play.txt").write_text("".join(f"KING {i}: my lord, the night is long.\n" for i in range(300)))
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--tokenizer", "bytes", "--corpus", str(tmp_path / "play.txt"),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0", "--no-progress",
                 "--out", str(run)]) == 0
    assert any("val_loss" in r for r in read_metrics(run / "metrics.jsonl"))
    assert capsys.readouterr().err == ""


def test_an_unknown_tokenizer_lists_bpe_among_the_choices(corpus, tmp_path):
    with pytest.raises(SystemExit, match=r"mixcon train: --tokenizer 'bpee': expected 'bpe' \(train a byte-level "
                                         r"BPE on the corpus\), 'bytes', a tokenizer.json file"):
        main(["train", "--config", "tiny", "--tokenizer", "bpee", "--corpus", str(corpus), "--steps", "1",
              "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_tensorboard_missing_is_refused_before_anything_is_written(corpus, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(SystemExit, match=r"mixcon train: TensorBoard logging needs the tensorboard package"):
        main(["train", "--config", "tiny", "--corpus", str(corpus), "--steps", "1", "--tensorboard",
              "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_run_directory_in_use_is_refused_and_one_that_cannot_be_made_named(corpus, tmp_path, capsys, monkeypatch):
    """One trainer per run: a second one (here: this process holding the lock) is refused before any work,
    instead of replacing the first one's checkpoints and metrics; an --out that cannot be made says so. The
    commands printed at the end quote the run's path."""
    from mixcon.training.checkpoint import lock_run

    run = tmp_path / "my run"
    argv = ["train", "--config", "tiny", "--tokenizer", "bytes", "--corpus", str(corpus), "--steps", "1",
            "--sample-tokens", "0", "--no-progress"]
    with lock_run(run), pytest.raises(SystemExit, match=rf"mixcon train: {re.escape(str(run))} is in use by another "
                                                        rf"training process \(pid {os.getpid()}\)"):
        main([*argv, "--out", str(run)])
    assert not run.exists()  # made for the lock alone, and removed with it
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match=r"^mixcon train: --out .*afile/run: a file lies on its path; give a run "
                                         r"directory$"):
        main([*argv, "--out", str(tmp_path / "afile" / "run")])
    assert main([*argv, "--out", str(run)]) == 0 and list_checkpoints(run)
    assert f"continue:   mixcon train --out '{run}' --resume" in capsys.readouterr().out
    # A checkpoints/ folder that cannot be written (as a user without root's override sees it): refused before any
    # step, not at the first save
    real_access = os.access
    with monkeypatch.context() as m:
        m.setattr("mixcon.cli.train.os.access", lambda p, mode: Path(p).name != "checkpoints" and real_access(p, mode))
        with pytest.raises(SystemExit, match=r"my run/checkpoints: cannot write there \(the run's checkpoints are "
                                             r"saved there\)"):
            main([*argv, "--out", str(run), "--resume", "--steps", "2"])


def test_resume_continues_on_the_runs_shards_after_a_split_rule_change(corpus, tmp_path, monkeypatch):
    """A run made before the split rule changed: resuming rebuilt its shards (deleting the old ones) and the
    loader then refused the checkpoint; it continues on the shards its checkpoint read."""
    from mixcon.data import shards as shards_module

    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--tokenizer", "bytes", "--corpus", str(corpus), "--steps", "2",
                 "--sample-tokens", "0", "--no-progress", "--out", str(run)]) == 0
    built = sorted(p.name for p in (run / "data").iterdir())
    monkeypatch.setattr(shards_module, "SPLIT_RULE", shards_module.SPLIT_RULE + 1)
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--sample-tokens", "0", "--no-progress"]) == 0
    assert sorted(p.name for p in (run / "data").iterdir()) == built


class _Stop(Exception):
    """Raised in place of training, once what the run was given is recorded."""


def resumed_options(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[str],
                    *resumes: list[str]) -> list[TrainOptions]:
    """A 2-step run started with `started`, then what the trainer is given when it is resumed with each of
    `resumes` (it trains no further)."""
    run = ["train", "--config", "tiny", "--tokenizer", "bytes", "--corpus", str(corpus), "--batch-size", "2",
           "--seq-len", "16", "--steps", "2", "--sample-tokens", "0", "--no-progress", "--out", str(tmp_path / "run")]
    assert main([*run, *started]) == 0
    seen = []

    def record(self, **kwargs):
        seen.append(self.options)
        raise _Stop

    monkeypatch.setattr(Trainer, "fit", record)
    for extra in resumes:
        with pytest.raises(_Stop):
            main(["train", "--out", str(tmp_path / "run"), "--resume", "--no-progress", *extra])
    return seen


def test_a_resume_given_a_time_budget_alone_trains_by_it_not_by_the_runs_steps(corpus, tmp_path, monkeypatch,
                                                                              capsys):
    """--time-budget on --resume is a budget for this command, to whose end the schedule is refitted: the run's
    --steps go (as --steps alone drops the run's budget)."""
    (options,) = resumed_options(corpus, tmp_path, monkeypatch, [], ["--time-budget", "60"])
    assert (options.steps, options.time_budget) == (None, 60)
    assert "resume: steps changes from 2 to None" in capsys.readouterr().out


def test_a_switch_a_run_was_started_with_is_turned_off_on_resume_by_its_no_flag(corpus, tmp_path, monkeypatch,
                                                                               capsys):
    seen = resumed_options(corpus, tmp_path, monkeypatch, ["--activation-checkpointing"], ["--steps", "3"],
                           ["--steps", "3", "--no-activation-checkpointing"])
    assert [options.activation_checkpointing for options in seen] == [True, False]
    assert "resume: activation_checkpointing changes from True to False" in capsys.readouterr().out


def test_what_the_trainer_is_given_by_default_and_by_flags(corpus, tmp_path, monkeypatch):
    """With neither --steps nor --time-budget: the default budget, less the sample's reserve as the deadline; the
    run directory runs/<config name>; the first 4 MB of the corpus, or with --max-bytes 0 all of it. The default
    budget only then: --steps alone trains them all (no 480 s cut), --time-budget alone trains for it (no step
    count)."""
    import time

    from mixcon.cli import train

    seen = []

    def record(self, **kwargs):
        deadline = kwargs["deadline"]  # None: no time budget
        seen.append((self.options, None if deadline is None else deadline - time.monotonic(), self.run_dir))
        raise _Stop

    monkeypatch.setattr(Trainer, "fit", record)
    monkeypatch.setattr(train, "SAMPLE_SECONDS", 200.0)  # a reserve that no slow preparation could hide
    monkeypatch.chdir(tmp_path)
    base = ["train", "--config", "tiny", "--tokenizer", "bytes", "--corpus", str(corpus), "--batch-size", "2",
            "--seq-len", "16", "--no-progress"]
    for extra in ([], ["--max-bytes", "0", "--sample-tokens", "0", "--out", "other"],
                  ["--steps", "5000", "--sample-tokens", "0", "--out", "steps"],
                  ["--time-budget", "60", "--sample-tokens", "0", "--out", "budget"]):
        with pytest.raises(_Stop):
            main([*base, *extra])
    (options, left, run_dir), (options0, left0, run_dir0), (by_steps, no_deadline, _), (by_budget, _, _) = seen
    assert options.time_budget == train.DEFAULT_TIME_BUDGET == 480 and options.max_bytes == 4_000_000
    assert train.DEFAULT_TIME_BUDGET - 200 - 60 < left < train.DEFAULT_TIME_BUDGET - 200
    assert Path(run_dir) == Path("runs") / "tiny" and Path(run_dir0) == Path("other")
    assert options0.max_bytes is None and train.DEFAULT_TIME_BUDGET - 60 < left0 <= train.DEFAULT_TIME_BUDGET
    assert ShardDataset(tmp_path / "other" / "data").index["max_bytes"] is None
    assert (by_steps.steps, by_steps.time_budget, no_deadline) == (5000, None, None)
    assert (by_budget.steps, by_budget.time_budget) == (None, 60.0)


def test_the_sample_is_seeded_by_the_run_and_prompted_from_the_validation_text(corpus, tmp_path, monkeypatch):
    from mixcon.cli import train

    sampled = []
    monkeypatch.setattr(train, "stream", lambda model, tok, prompt, n, seed: sampled.append((prompt, n, seed)))
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--tokenizer", "bytes", "--corpus", str(corpus), "--steps", "1",
                 "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "5", "--seed", "7", "--val-fraction",
                 "0.2", "--no-progress", "--out", str(run)]) == 0
    ds, tok = ShardDataset(run / "data"), ByteTokenizer()
    val = tok.decode(ds.tokens("val")[:12].tolist())
    assert sampled == [(val, 5, 7)] and val != tok.decode(ds.tokens("train")[:12].tolist())


def test_runs_of_one_seed_start_from_the_same_weights_whatever_drew_before(corpus, tmp_path):
    """--seed decides the initial weights: two runs of it in one process (the first drew from torch's generator)
    train the same model."""
    models = []
    for name in ("a", "b"):
        assert main(["train", "--config", "tiny", "--tokenizer", "bytes", "--corpus", str(corpus), "--steps", "1",
                     "--batch-size", "2", "--seq-len", "16", "--seed", "3", "--sample-tokens", "0", "--no-progress",
                     "--out", str(tmp_path / name)]) == 0
        models.append(MixConForCausalLM.from_pretrained(list_checkpoints(tmp_path / name)[-1]).state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_the_warmup_is_said_shortened_only_when_it_is(corpus, tmp_path, capsys):
    """`lr_at` warms up over at most all but the last of --steps: a warmup that fits is not said shortened, nor is
    a 1-step run's (it has no warmup to shorten); one longer than steps - 1 is."""
    argv = ["train", "--config", "tiny", "--tokenizer", "bytes", "--corpus", str(corpus), "--batch-size", "2",
            "--seq-len", "16", "--sample-tokens", "0", "--no-progress"]
    assert main([*argv, "--steps", "3", "--warmup-steps", "2", "--out", str(tmp_path / "fits")]) == 0
    assert main([*argv, "--steps", "1", "--out", str(tmp_path / "one")]) == 0  # default warmup: 20 steps
    assert "warmup:" not in capsys.readouterr().out
    assert main([*argv, "--steps", "3", "--warmup-steps", "3", "--out", str(tmp_path / "longer")]) == 0
    assert "warmup: 3 steps shortened to 2, all but the last of --steps 3\n" in capsys.readouterr().out


def test_a_resume_refuses_every_option_that_would_change_its_data(corpus, tmp_path, monkeypatch):
    """--max-bytes and --val-fraction decide the shards as --corpus and --seed do: a resumed run keeps them (its
    shards are reused, so a new value would be recorded but not used)."""
    resumed_options(corpus, tmp_path, monkeypatch, [])
    for flag, value in (("--max-bytes", "100"), ("--val-fraction", "0.5")):
        with pytest.raises(SystemExit, match=rf"continues on the run's data; {flag} would change it"):
            main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "3", flag, value])
