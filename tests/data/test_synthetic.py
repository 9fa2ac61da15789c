"""MQAR sequences: their layout, and every label read back from the listing by a plain lookup."""

from __future__ import annotations

import pytest
import torch

from mixcon.data.synthetic import RecallTask, insert_filler
from mixcon.models.mixcon import IGNORE


def lookup_labels(ids: list[int], num_pairs: int) -> list[int]:
    """What a perfect recaller is asked for: after the listing, each key's value; IGNORE elsewhere."""
    table = dict(zip(ids[0:2 * num_pairs:2], ids[1:2 * num_pairs:2], strict=True))
    return [table[t] if i >= 2 * num_pairs and t in table else IGNORE for i, t in enumerate(ids)]


@pytest.mark.parametrize("vocab_size,seq_len,num_pairs", [(64, 64, 8), (32, 40, 10), (16, 100, 7), (5, 8, 2)])
def test_sequences_list_the_pairs_then_ask_each_key_once(vocab_size, seq_len, num_pairs):
    task = RecallTask(vocab_size=vocab_size, seq_len=seq_len)
    ids, labels = task.sample(16, num_pairs, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (16, seq_len)
    for row, row_labels in zip(ids.tolist(), labels.tolist(), strict=True):
        keys, values = row[0:2 * num_pairs:2], row[1:2 * num_pairs:2]
        assert len(set(keys)) == num_pairs and all(1 <= k <= task.keys for k in keys)
        assert all(task.keys < v < vocab_size for v in values)
        asked = [i for i in range(2 * num_pairs, seq_len) if row[i] != 0]
        assert sorted(row[i] for i in asked[0::2]) == sorted(keys)  # every key once, each followed by its value
        assert [row[i + 1] for i in asked[0::2]] == [dict(zip(keys, values, strict=True))[row[i]] for i in asked[0::2]]
        assert asked[1::2] == [i + 1 for i in asked[0::2]]
        assert row_labels == lookup_labels(row, num_pairs)


def test_draws_follow_the_generator_and_vary():
    task = RecallTask(vocab_size=64, seq_len=64)
    a = task.sample(8, 6, torch.Generator().manual_seed(1))
    b = task.sample(8, 6, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], task.sample(8, 6, torch.Generator().manual_seed(2))[0])
    assert len({tuple(r) for r in a[0].tolist()}) == 8  # rows differ
    queried = (a[1] != IGNORE).nonzero()[:, 1]
    assert queried.min() >= 12 and len(set(queried.tolist())) > 20  # the queries land at many places


def test_keys_are_asked_in_a_random_order_and_values_span_their_whole_range():
    """Not in listing order (a model could then recall by position alone); every value id drawn, the last too."""
    task = RecallTask(vocab_size=16, seq_len=64)
    ids, _ = task.sample(200, 6, torch.Generator().manual_seed(0))  # 7 keys, 8 values
    in_order = 0
    for row in ids.tolist():
        listed = row[0:12:2]
        asked = [t for t in row[12:] if 1 <= t <= task.keys]
        in_order += asked == listed
    assert in_order < 3  # 1 in 6! by chance
    values = ids[:, 1:12:2]
    assert set(values.unique().tolist()) == set(range(1 + task.keys, 16))


def test_key_and_value_split():
    assert (RecallTask(64, 32).keys, RecallTask(64, 32).values) == (31, 32)
    assert (RecallTask(64, 32, n_keys=10).keys, RecallTask(64, 32, n_keys=10).values) == (10, 53)
    assert RecallTask(64, 32).max_pairs() == 8 and RecallTask(10, 400).max_pairs() == 4


@pytest.mark.parametrize("kwargs,num_pairs,message", [
    (dict(vocab_size=2, seq_len=8), 1, "vocab_size=2"),
    (dict(vocab_size=10, seq_len=8, n_keys=9), 1, "n_keys=9"),
    (dict(vocab_size=10, seq_len=8, n_keys=0), 1, "n_keys=0"),
    (dict(vocab_size=64, seq_len=32), 9, r"num_pairs=9 must be in \[1, 8\]"),
    (dict(vocab_size=64, seq_len=32), 0, "num_pairs=0"),
])
def test_impossible_tasks_are_errors_that_name_the_field(kwargs, num_pairs, message):
    with pytest.raises(ValueError, match=message):
        RecallTask(**kwargs).sample(2, num_pairs)


@pytest.mark.parametrize("ratio,R", [(0, 5), (1, 6), (2.5, 4), (0.3, 10), (0.5, 3), (0.7, 3)])  # 1.5, 2.1 round
def test_insert_filler_keeps_the_real_tokens_in_order_and_targets_the_next_real_one(ratio, R):
    ids = torch.randint(0, 50, (6, R), generator=torch.Generator().manual_seed(0))
    inputs, labels = insert_filler(ids, ratio, 99, torch.Generator().manual_seed(1))
    assert inputs.shape == labels.shape == (6, R + round(ratio * R))
    for row, got, targets in zip(ids.tolist(), inputs.tolist(), labels.tolist(), strict=True):
        assert [t for t in got if t != 99] == row and got.count(99) == round(ratio * R)
        places = [i for i, t in enumerate(got) if t != 99]
        assert [targets[i] for i in places] == [*row[1:], IGNORE]
        assert all(targets[i] == IGNORE for i, t in enumerate(got) if t == 99)
    if ratio == 0:
        assert torch.equal(inputs, ids)
    again = insert_filler(ids, ratio, 99, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def test_insert_filler_places_differ_between_rows_and_draws():
    ids = torch.arange(8).repeat(4, 1)
    generator = torch.Generator().manual_seed(0)
    first, _ = insert_filler(ids, 2, 99, generator)
    second, _ = insert_filler(ids, 2, 99, generator)
    assert len({tuple(r) for r in first.tolist()}) > 1 and not torch.equal(first, second)


@pytest.mark.parametrize("ids,ratio,match", [
    (torch.zeros(2, 1, dtype=torch.long), 1, r"R >= 2"),
    (torch.zeros(2, 4, dtype=torch.long), -1, "ratio=-1"),
    (torch.zeros(2, 4, dtype=torch.long), float("inf"), "finite"),
    (torch.zeros(2, 4, dtype=torch.long), 1e30, r"ratio=1e\+30 gives rows of 4e\+30 tokens, more than a tensor can"),
    (torch.full((2, 4), 99), 1, "filler_id=99 occurs among the real tokens"),
])
def test_insert_filler_rejects_bad_input(ids, ratio, match):
    with pytest.raises(ValueError, match=match):
        insert_filler(ids, ratio, 99)
