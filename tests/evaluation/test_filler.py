"""The next-real-token loss among fillers, against an oracle that ignores fillers by construction."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mixcon.evaluation.filler import filler_loss
from mixcon.models.mixcon import MixConOutput

V, FILLER = 12, 11


def bigram_oracle(table: torch.Tensor):
    """A forward (and LM head) whose log-probabilities at each position are table[last real token up to there]:
    its final hidden state is that token, one-hot, and the head's weight is the table's transpose."""
    def forward(ids, **_):
        hidden = torch.zeros(*ids.shape, V)
        for b, row in enumerate(ids.tolist()):
            last = None
            for t, token in enumerate(row):
                last = token if token != FILLER else last
                if last is not None:
                    hidden[b, t, last] = 1.0
        return MixConOutput(logits=hidden @ table, last_hidden_state=hidden)
    head = torch.nn.Linear(V, V, bias=False)
    head.weight.data = table.t().contiguous()
    return forward, head


@pytest.mark.parametrize("ratio", [0, 0.5, 3])
def test_a_model_that_ignores_fillers_scores_the_same_at_every_ratio(tiny_model, monkeypatch, ratio):
    table = torch.randn(V, V).log_softmax(-1)
    windows = torch.randint(0, FILLER, (7, 9), generator=torch.Generator().manual_seed(0))
    model = tiny_model(vocab_size=V)
    forward, head = bigram_oracle(table)
    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(model, "lm_head", head)
    nll = -sum(float(table[a, b]) for row in windows.tolist() for a, b in itertools.pairwise(row)) / (7 * 8)
    assert filler_loss(model, windows, ratio, FILLER, batch_size=3) == pytest.approx(nll, rel=1e-6)


def test_fillers_change_a_real_models_loss(tiny_model):
    windows = torch.randint(0, FILLER, (4, 10), generator=torch.Generator().manual_seed(1))
    model = tiny_model(vocab_size=V)
    plain, padded = (filler_loss(model, windows, r, FILLER) for r in (0, 2))
    assert math.isfinite(plain) and abs(plain - padded) > 1e-6


def test_the_filler_places_follow_the_seed(tiny_model):
    windows = torch.randint(0, FILLER, (5, 10), generator=torch.Generator().manual_seed(2))
    model = tiny_model(vocab_size=V)
    first, again, other = (filler_loss(model, windows, 1.5, FILLER, seed=s) for s in (0, 0, 1))
    assert first == again and abs(first - other) > 1e-6


def test_the_filler_places_do_not_depend_on_the_batch_size(tiny_model):
    windows = torch.randint(0, FILLER, (5, 10), generator=torch.Generator().manual_seed(2))
    model = tiny_model(vocab_size=V)
    whole, *parts = (filler_loss(model, windows, 1.5, FILLER, batch_size=b, seed=4) for b in (5, 2, 1))
    assert parts == pytest.approx([whole, whole], rel=1e-5)


def test_bad_sizes_are_refused_by_name(tiny_model):
    model = tiny_model(vocab_size=V)
    windows = torch.randint(0, FILLER, (4, 10))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=rf"filler_loss: batch_size={bad} must be an integer >= 1"):
            filler_loss(model, windows, 1, FILLER, batch_size=bad)
    with pytest.raises(ValueError, match=r"filler_loss: windows must be \(N, R\) with N >= 1, got \(0, 10\)"):
        filler_loss(model, windows[:0], 1, FILLER)


def test_a_training_model_is_scored_in_eval_mode_and_left_training(tiny_model, monkeypatch):
    model = tiny_model(vocab_size=V).train()
    modes, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: modes.append(model.training) or forward(*a, **kw))
    filler_loss(model, torch.randint(0, FILLER, (5, 6)), 0.5, FILLER, batch_size=3)
    assert modes == [False, False] and model.training
