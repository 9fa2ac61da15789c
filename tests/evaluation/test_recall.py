"""Recall accuracy against oracles that look the keys up, and the MQAR training loop."""

from __future__ import annotations

import pytest
import torch

from mixcon.benchmarks.recall import train_on_recall
from mixcon.data.synthetic import RecallTask
from mixcon.evaluation.recall import recall_accuracy
from mixcon.models.mixcon import IGNORE, MixConOutput

TASK = RecallTask(vocab_size=48, seq_len=48)


def lookup_oracle(vocab_size: int, wrong_from: int):
    """A forward whose top logit at each asked key is the value listed with it, or another value for keys
    numbered `wrong_from` and up."""
    def forward(ids, **_):
        logits = torch.zeros(*ids.shape, vocab_size)
        for b, row in enumerate(ids.tolist()):
            listed = dict(zip(row[0::2], row[1::2], strict=True))  # first pairs; the rest only adds noise
            for i, token in enumerate(row):
                if token in listed and listed[token] > TASK.keys:
                    value = listed[token]
                    if token >= wrong_from:
                        value = TASK.keys + 1 + (value - TASK.keys) % TASK.values  # the next value, cyclically
                    logits[b, i, value] = 1.0
        return MixConOutput(logits=logits)
    return forward


def test_a_perfect_lookup_scores_one_and_a_partial_one_its_share(tiny_model, monkeypatch):
    model = tiny_model(vocab_size=TASK.vocab_size)
    monkeypatch.setattr(model, "forward", lookup_oracle(TASK.vocab_size, wrong_from=TASK.keys + 1))
    assert recall_accuracy(model, TASK, 8, sequences=40, batch_size=16) == 1.0
    wrong_from = TASK.keys // 2
    monkeypatch.setattr(model, "forward", lookup_oracle(TASK.vocab_size, wrong_from))
    ids, labels = TASK.sample(40, 8, torch.Generator().manual_seed(3))  # recall_accuracy's draw
    asked = ids[labels != IGNORE]
    share = int((asked < wrong_from).sum()) / asked.numel()
    assert 0.2 < share < 0.8
    for batch_size in (40, 7, 1):  # the same held-out sequences for every batch size
        assert recall_accuracy(model, TASK, 8, sequences=40, batch_size=batch_size, seed=3) == share


def test_training_on_recall_learns_the_value_vocabulary(tiny_model):
    """A few steps move the loss from ln(vocab) towards ln(values): the labels are the values."""
    model = tiny_model(vocab_size=TASK.vocab_size)
    losses = train_on_recall(model, TASK, [2, 4], steps=40, batch_size=16, lr=3e-3)
    assert len(losses) == 40 and losses[0] > 3.6  # ln 48 = 3.87
    assert sum(losses[-5:]) / 5 < 3.4  # ln 24 = 3.18 for a uniform guess among the values


def test_bad_sizes_are_refused_by_name(tiny_model):
    model = tiny_model(vocab_size=TASK.vocab_size)
    for name, value in (("sequences", 0), ("batch_size", 0), ("batch_size", 2.5)):
        with pytest.raises(ValueError, match=rf"recall_accuracy: {name}={value!r} must be an integer >= 1"):
            recall_accuracy(model, TASK, 2, **{name: value})
    small = tiny_model(vocab_size=TASK.vocab_size - 1)
    with pytest.raises(ValueError, match=rf"the model's vocab_size={TASK.vocab_size - 1} is smaller than the task's "
                                         rf"{TASK.vocab_size}"):
        recall_accuracy(small, TASK, 2)


def test_a_training_model_is_scored_in_eval_mode_and_left_training(tiny_model, monkeypatch):
    model = tiny_model(vocab_size=TASK.vocab_size).train()
    modes, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: modes.append(model.training) or forward(*a, **kw))
    recall_accuracy(model, TASK, 4, sequences=6, batch_size=4)
    assert modes == [False, False] and model.training
