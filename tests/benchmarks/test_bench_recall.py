"""`mixcon.benchmarks.recall`: multi-query associative recall of the three twins."""

from __future__ import annotations

import json

import pytest
import torch

from mixcon.benchmarks import common
from mixcon.cli import main
from mixcon.config import MixConConfig
from mixcon.models.mixcon import MixConForCausalLM


def test_recall_benchmark_trains_and_scores_the_three_twins(tmp_path):
    argv = ["bench", "recall", "--set", "d_model=16", "--pairs", "4,2", "--seq-len", "16", "--vocab", "16",
            "--steps", "2", "--batch-size", "4", "--sequences", "6", "--out", str(tmp_path)]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "recall.json").read_text())
    rows = payload["rows"]
    assert [r["model"] for r in rows] == ["mixcon", "transformer-twin", "conba-twin"]
    assert [r["layout"].count("A") for r in rows] == [2, 8, 0]
    assert [r["conba_state_floats"] for r in rows] == [2 * 16 * 8, None, 2 * 16 * 8]  # H x P x N per layer
    assert all(r["final_loss"] > 2 for r in rows)  # the mean of 2 steps' losses, near ln 16
    assert payload["pairs"] == [2, 4] and payload["task"]["vocab_size"] == 16
    assert payload["machine"]["torch"] == torch.__version__  # every result file says where it was measured
    # 6 sequences x 2 or 4 asked keys: accuracies are multiples of 1/12 or 1/24 in [0, 1]
    assert all(0 <= r["acc@2"] <= 1 and (r["acc@2"] * 12) % 1 < 1e-9 for r in rows)
    assert all(0 <= r["acc@4"] <= 1 and (r["acc@4"] * 24) % 1 < 1e-9 for r in rows)
    assert (tmp_path / "recall.png").stat().st_size > 0
    assert main([*argv, "--models", "conba-twin", "--out", str(tmp_path / "one")]) == 0
    assert [r["model"] for r in json.loads((tmp_path / "one" / "recall.json").read_text())["rows"]] == ["conba-twin"]


@pytest.mark.parametrize("argv,message", [
    (["--pairs", "2,5", "--seq-len", "16"], r"--pairs 2,5: each must be in \[1, 4\]"),
    (["--models", "mixcon,llama"], "unknown llama"),
])
def test_recall_benchmark_rejects_bad_arguments(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):  # (--out: a run that is not refused writes there, not in docs/)
        main(["bench", "recall", "--out", str(tmp_path), *argv])


def test_recall_benchmark_scores_each_pair_count_on_held_out_seeds_with_the_tasks_vocabulary(tmp_path, monkeypatch):
    from mixcon.benchmarks import recall
    from mixcon.data.synthetic import RecallTask

    scored = []

    def accuracy(model, task, num_pairs, *, sequences, seed):
        scored.append((model.config.vocab_size, num_pairs, sequences, seed))
        return num_pairs / 100

    monkeypatch.setattr(recall, "train_on_recall", lambda *a, **kw: [5.0] * 10 + [1.0] * 10 + [3.0] * 10)
    monkeypatch.setattr(recall, "recall_accuracy", accuracy)
    task = RecallTask(vocab_size=16, seq_len=16)
    base = MixConConfig.preset("tiny", d_model=16)
    settings = dict(steps=1, batch_size=2, lr=1e-3, sequences=6, seed=7, out_dir=tmp_path)
    rows = recall.run(base, task, [2, 4], models=["mixcon"], **settings)
    assert scored == [(16, 2, 6, 8), (16, 4, 6, 8)]  # every pair count, sequences from seed + 1, vocab the task's
    assert (rows[0]["acc@2"], rows[0]["acc@4"]) == (0.02, 0.04)
    assert rows[0]["final_loss"] == 2.0  # the mean loss of the last 20 steps
    assert rows[0]["params"] == MixConForCausalLM(base.replace(vocab_size=16)).num_parameters()
    payload = json.loads((tmp_path / "recall.json").read_text())
    assert payload["task"] == dict(vocab_size=16, seq_len=16, keys=7, values=8)
    assert {k: payload[k] for k in ("steps", "batch_size", "lr", "sequences", "seed")} == {
        k: settings[k] for k in ("steps", "batch_size", "lr", "sequences", "seed")}
    assert payload["base"] == base.to_dict() and payload["pairs"] == [2, 4]
    for change, field in ((dict(task=RecallTask(vocab_size=16, seq_len=20)), "task"), (dict(sequences=7), "sequences"),
                          (dict(seed=8), "seed")):
        args = dict(task=task, **settings) | change
        with pytest.raises(common.UsageError, match=rf"was written with other {field}"):
            recall.run(base, args.pop("task"), [2, 4], models=["mixcon"], resume=True, **args)


def test_recall_training_draws_every_pair_count(monkeypatch):
    from mixcon.benchmarks import recall
    from mixcon.data.synthetic import RecallTask

    drawn = set()

    def briefly(model, batch, *, steps, lr, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            _, labels = batch(generator)
            drawn.add(int((labels[0] != -100).sum()))  # the asked keys: the pair count
        return [1.0]

    monkeypatch.setattr(recall.common, "train_briefly", briefly)
    recall.train_on_recall(None, RecallTask(vocab_size=16, seq_len=16), [1, 2, 4], steps=60, batch_size=2, lr=1e-3)
    assert drawn == {1, 2, 4}
