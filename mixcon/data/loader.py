"""Batches from token shards: random windows for training (seeded, resumable), sequential ones for evaluation.

A batch is (input_ids, labels), both (B, T) int64, cut from windows of T+1 consecutive tokens:
labels[:, t] is the token after input_ids[:, t].
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from mixcon.data.shards import ShardDataset

Batch = tuple[torch.Tensor, torch.Tensor]


def _split_tokens(ds: ShardDataset, split: str, seq_len: int, batch_size: int) -> np.ndarray:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len}, batch_size={batch_size}: both must be at least 1")
    tokens = ds.tokens(split)
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the {split} split of {ds.directory} has {len(tokens)} tokens, fewer than one window of "
                         f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len (--seq-len) or a larger corpus")
    return tokens


class TrainLoader:
    """Endless batches of `batch_size` windows at random positions of a split.

    Batch i depends only on (seed, i) and the shards, so `state_dict()` (seed, step and the shards' key)
    resumes the stream exactly, and refuses other shards.
    """

    def __init__(self, ds: ShardDataset, seq_len: int, batch_size: int, seed: int = 0, split: str = "train"):
        if seed < 0:
            raise ValueError(f"seed={seed}: must be a non-negative integer")
        self.tokens = _split_tokens(ds, split, seq_len, batch_size)  # (N,)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.data = str(ds.index["key"])  # tokenizer, corpus content and split of the shards
        self.step = 0

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        rng = np.random.default_rng([self.seed, self.step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)  # last start: N - T - 1
        self.step += 1
        windows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int | str]:
        return {"seed": self.seed, "step": self.step, "data": self.data}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        """Continue from a `state_dict()`: the next batch is the one that followed it (in the same shards; a
        state saved before the key was recorded has none to check)."""
        if set(state) not in ({"seed", "step"}, {"seed", "step", "data"}):
            raise ValueError(f"loader state has keys {sorted(state)}, expected ['data', 'seed', 'step']")
        if state.get("data", self.data) != self.data:
            raise ValueError(f"the checkpoint's data position is in other shards (key {str(state['data'])[:16]}, "
                             f"these are {self.data[:16]}): the corpus, tokenizer, validation split or max_bytes "
                             "changed since it was saved; resuming would continue on other text (to train on new "
                             "text, start a new run from the weights: mixcon train --init-from)")
        self.seed, self.step = int(state["seed"]), int(state["step"])


def eval_batches(ds: ShardDataset, seq_len: int, batch_size: int, max_batches: int | None = None,
                 split: str = "val") -> Iterator[Batch]:
    """Consecutive non-overlapping windows from the start of a split, in order (the last batch may be smaller).

    Window i covers tokens [i*T, i*T + T]; the final (N - 1) % T tokens, too few for a window, are left out.
    """
    tokens = _split_tokens(ds, split, seq_len, batch_size)
    n_windows = (len(tokens) - 1) // seq_len
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)

    def batches() -> Iterator[Batch]:
        for first in range(0, n_windows, batch_size):
            count = min(batch_size, n_windows - first)
            chunk = torch.from_numpy(tokens[first * seq_len:(first + count) * seq_len + 1].astype(np.int64))
            yield chunk[:-1].view(count, seq_len), chunk[1:].view(count, seq_len)

    return batches()
