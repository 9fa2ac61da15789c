"""Loaders: random training windows are contiguous, seeded and resumable; evaluation windows are sequential."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mixcon.data import ByteTokenizer, Corpus, TrainLoader, eval_batches, prepare_shards


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """Bytes shards of 40 random-letter documents: ~20K train tokens, windows unique by content."""
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (folder / f"{i:02d}.txt").write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(500)))
    return prepare_shards(Corpus.from_spec(str(folder)), ByteTokenizer(), folder / "shards", val_fraction=0.25,
                          progress=False)


def window_starts(stream: np.ndarray, input_ids: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """Where each row's window of T+1 tokens sits in the stream (fails if it is not a contiguous slice)."""
    T = input_ids.shape[1]
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(stream, dtype=np.int64), T + 1)  # (N-T, T+1)
    starts = []
    for x, y in zip(input_ids.numpy(), labels.numpy(), strict=True):
        row = np.concatenate([x, y[-1:]])
        assert np.array_equal(x[1:], y[:-1])
        hits = np.flatnonzero((windows == row).all(axis=1))
        assert len(hits) == 1, "row is not a contiguous slice of the stream"
        starts.append(int(hits[0]))
    return starts


def test_train_windows_are_contiguous_slices_of_the_stream(ds):
    loader = TrainLoader(ds, seq_len=32, batch_size=8, seed=0)
    starts = []
    for _ in range(5):
        input_ids, labels = next(loader)
        assert input_ids.shape == labels.shape == (8, 32)
        assert input_ids.dtype == labels.dtype == torch.int64
        assert input_ids.is_contiguous() and labels.is_contiguous()  # (not views of one (B, T+1) array: .view works)
        starts += window_starts(ds.train, input_ids, labels)
    assert len(set(starts)) == len(starts)  # random positions, not a fixed few
    assert max(starts) - min(starts) > len(ds.train) // 2


def test_seed_decides_the_batches(ds):
    a, b, c = (TrainLoader(ds, seq_len=16, batch_size=4, seed=s) for s in (1, 1, 2))
    for _ in range(3):
        xa, xb, xc = next(a)[0], next(b)[0], next(c)[0]
        assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    zero, one = TrainLoader(ds, seq_len=16, batch_size=4, seed=0), TrainLoader(ds, seq_len=16, batch_size=4, seed=1)
    zeros = [next(zero)[0] for _ in range(4)]
    assert not any(torch.equal(next(one)[0], z) for z in zeros[1:])  # seed 1 is not seed 0 one batch later


def test_resume_equals_uninterrupted(ds):
    straight = TrainLoader(ds, seq_len=16, batch_size=4, seed=7)
    expected = [next(straight) for _ in range(7)]
    first = TrainLoader(ds, seq_len=16, batch_size=4, seed=7)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    resumed = TrainLoader(ds, seq_len=16, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    for want in expected[3:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match=r"loader state has keys \['step'\], expected \['data', 'seed', 'step'\]"):
        resumed.load_state_dict({"step": 1})
    resumed.load_state_dict({"seed": 7, "step": 3})  # saved before the shards' key was recorded: unchecked


def test_a_position_in_other_shards_is_refused(ds, tmp_path):
    """Resuming on shards built from another corpus (or tokenizer, or split) would continue on other text."""
    (tmp_path / "a.txt").write_text("another corpus " * 200)
    (tmp_path / "b.txt").write_text("and its second document " * 100)
    other = prepare_shards(Corpus.from_spec(str(tmp_path)), ByteTokenizer(), tmp_path / "shards", val_fraction=0.5,
                           progress=False)
    state = TrainLoader(ds, seq_len=16, batch_size=4).state_dict()
    with pytest.raises(ValueError, match="the checkpoint's data position is in other shards"):
        TrainLoader(other, seq_len=16, batch_size=4).load_state_dict(state)


def test_eval_batches_walk_the_split_in_order(ds):
    T, B = 50, 4
    val = np.asarray(ds.val, dtype=np.int64)
    batches = list(eval_batches(ds, seq_len=T, batch_size=B))
    n = (len(val) - 1) // T
    assert [x.shape[0] for x, _ in batches] == [B] * (n // B) + ([n % B] if n % B else [])
    assert all(x.dtype == y.dtype == torch.int64 for x, y in batches)  # as training batches (labels for the loss)
    inputs = torch.cat([x.reshape(-1) for x, _ in batches]).numpy()
    labels = torch.cat([y.reshape(-1) for _, y in batches]).numpy()
    assert np.array_equal(inputs, val[:n * T]) and np.array_equal(labels, val[1:n * T + 1])
    assert len(list(eval_batches(ds, seq_len=T, batch_size=B, max_batches=2))) == 2
    train = list(eval_batches(ds, seq_len=T, batch_size=B, max_batches=1, split="train"))
    assert np.array_equal(train[0][0].numpy().reshape(-1), np.asarray(ds.train[:B * T], dtype=np.int64))


def test_loader_errors(ds):
    too_long = len(ds.val)
    with pytest.raises(ValueError, match=rf"the val split of .* has {too_long} tokens, fewer than one window "
                                         r".*; use a shorter seq_len \(--seq-len\)"):
        eval_batches(ds, seq_len=too_long, batch_size=1)
    with pytest.raises(ValueError, match=r"seq_len=0, batch_size=1: both must be at least 1"):
        TrainLoader(ds, seq_len=0, batch_size=1)
    with pytest.raises(ValueError, match=r"seq_len=4, batch_size=0: both must be at least 1"):
        eval_batches(ds, seq_len=4, batch_size=0)
    with pytest.raises(ValueError, match=r"split 'test': expected one of train, val"):
        TrainLoader(ds, seq_len=4, batch_size=1, split="test")
    with pytest.raises(ValueError, match=r"seed=-1: must be a non-negative integer"):
        TrainLoader(ds, seq_len=4, batch_size=1, seed=-1)


def test_train_windows_reach_both_ends_of_a_short_stream(tmp_path):
    (tmp_path / "a.txt").write_text("abc")  # stream: a b c EOS
    tiny = prepare_shards(Corpus.from_spec(str(tmp_path / "a.txt")), ByteTokenizer(), tmp_path / "s", val_fraction=0,
                          progress=False)
    loader = TrainLoader(tiny, seq_len=2, batch_size=4)
    starts = {tuple(x.tolist()) for _ in range(10) for x in next(loader)[0]}
    assert starts == {(97, 98), (98, 99)}
    x, y = next(TrainLoader(tiny, seq_len=3, batch_size=2))
    assert x.tolist() == [[97, 98, 99]] * 2 and y.tolist() == [[98, 99, 257]] * 2


@pytest.mark.parametrize(("n_tokens", "shapes"), [(40, [(2, 10), (1, 10)]), (31, [(2, 10), (1, 10)]),
                                                  (41, [(2, 10), (2, 10)]), (11, [(1, 10)])])
def test_eval_windows_take_every_whole_window_and_a_smaller_last_batch(tmp_path, n_tokens, shapes):
    """A window is T inputs and the token after them: N tokens give (N - 1) // T windows, in batches of B."""
    (tmp_path / "a.txt").write_text("".join(chr(97 + i % 26) for i in range(n_tokens - 1)))  # + EOS
    stream = prepare_shards(Corpus.from_spec(str(tmp_path / "a.txt")), ByteTokenizer(), tmp_path / "s",
                            val_fraction=0, progress=False)
    batches = list(eval_batches(stream, seq_len=10, batch_size=2, split="train"))
    assert [tuple(x.shape) for x, _ in batches] == shapes
    tokens = np.asarray(stream.train, dtype=np.int64)
    n = sum(s[0] for s in shapes) * 10
    assert np.array_equal(torch.cat([y.reshape(-1) for _, y in batches]).numpy(), tokens[1:n + 1])
    assert list(eval_batches(stream, seq_len=10, batch_size=2, max_batches=0, split="train")) == []


def test_a_loader_is_its_own_iterator(ds):
    """`for x, y in loader` (or zip, islice) draws the batches next() does, and moves the position state_dict saves."""
    import itertools

    loader = TrainLoader(ds, seq_len=8, batch_size=2, seed=3)
    assert iter(loader) is loader
    drawn = list(itertools.islice(loader, 3))
    assert loader.state_dict()["step"] == 3
    again = TrainLoader(ds, seq_len=8, batch_size=2, seed=3)
    for (x, y), (x2, y2) in zip(drawn, (next(again) for _ in range(3)), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
