"""Synthetic probes of what a sequence mixer remembers and what it can ignore.

MQAR (Arora et al., "Zoology", 2023): a sequence first lists `num_pairs` key-value pairs, then asks for
every key again, at random places among filler tokens; after each queried key the model must emit
its value. Attention solves it at any length by looking the key up; a recurrent layer must hold all the
pairs in its state, so its accuracy falls once the pairs outgrow the state.

Uninformative tokens (Gu, "On the Tradeoffs of SSMs and Transformers", 2025): `insert_filler` puts
tokens that carry nothing at random places among real ones; a model that ignored them perfectly would
predict each next real token as well as without them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixcon.ops.cross_entropy import IGNORE


@dataclass(frozen=True)
class RecallTask:
    """Token layout of MQAR: 0 is the filler, keys are 1 .. n_keys, values the rest of the vocabulary."""

    vocab_size: int
    seq_len: int
    n_keys: int | None = None  # default: half of the non-filler tokens

    def __post_init__(self) -> None:
        if self.vocab_size < 3:
            raise ValueError(f"RecallTask: vocab_size={self.vocab_size} must be >= 3 (filler, a key, a value)")
        if not 1 <= self.keys < self.vocab_size - 1:
            raise ValueError(f"RecallTask: n_keys={self.n_keys} must be in [1, vocab_size - 2 = "
                             f"{self.vocab_size - 2}]")

    @property
    def keys(self) -> int:
        return (self.vocab_size - 1) // 2 if self.n_keys is None else self.n_keys

    @property
    def values(self) -> int:
        return self.vocab_size - 1 - self.keys

    def max_pairs(self) -> int:
        """The most pairs a sequence can hold: distinct keys, and 4 tokens per pair (listed, then asked)."""
        return min(self.keys, self.seq_len // 4)

    def sample(self, batch_size: int, num_pairs: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` sequences with `num_pairs` pairs each: input ids (B, T) and labels (B, T), the
        value at each queried key's position and IGNORE elsewhere (the model predicts the next token)."""
        if not 1 <= num_pairs <= self.max_pairs():
            raise ValueError(f"RecallTask.sample: num_pairs={num_pairs} must be in [1, {self.max_pairs()}] "
                             f"(distinct keys: {self.keys}; 4 tokens per pair in seq_len={self.seq_len})")
        B, D, T = batch_size, num_pairs, self.seq_len
        keys = 1 + torch.rand(B, self.keys, generator=generator).argsort(1)[:, :D]  # (B, D) distinct per row
        values = 1 + self.keys + torch.randint(0, self.values, (B, D), generator=generator)  # (B, D)
        ids = torch.zeros(B, T, dtype=torch.long)
        ids[:, 0:2 * D:2], ids[:, 1:2 * D:2] = keys, values
        # Queries: every key once, in a random order, each followed by its value, at random pair slots
        # of the rest of the sequence (the slots after the listing, two tokens each).
        slots = (T - 2 * D) // 2
        where = 2 * D + 2 * torch.rand(B, slots, generator=generator).argsort(1)[:, :D].sort(1).values  # (B, D)
        order = torch.rand(B, D, generator=generator).argsort(1)  # (B, D)
        ids.scatter_(1, where, keys.gather(1, order))
        ids.scatter_(1, where + 1, values.gather(1, order))
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        labels.scatter_(1, where, values.gather(1, order))
        return ids, labels


def filled_length(R: int, ratio: float) -> int:
    """The length of a row of R real tokens with round(ratio · R) fillers among them; a ratio that is not a finite
    number >= 0, or so large that the row could not be indexed (more than 2^63 - 1 tokens), is a ValueError."""
    if not 0 <= ratio < float("inf"):
        raise ValueError(f"ratio={ratio} must be a finite number >= 0 (fillers per real token)")
    T = R + round(ratio * R)
    if T > torch.iinfo(torch.int64).max:
        raise ValueError(f"ratio={ratio} gives rows of {T:.3g} tokens, more than a tensor can index")
    return T


def insert_filler(ids: torch.Tensor, ratio: float, filler_id: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of R real tokens (B, R) with round(ratio · R) `filler_id` tokens inserted at random places
    (the real tokens keep their order): inputs (B, T) and labels (B, T), the next real token at every
    real token but the last, IGNORE at the fillers (they are never targets)."""
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"insert_filler: ids must be (B, R) with R >= 2 real tokens, got {tuple(ids.shape)}")
    B, R = ids.shape
    try:
        T = filled_length(R, ratio)
    except ValueError as e:
        raise ValueError(f"insert_filler: {e}") from None
    if bool((ids == filler_id).any()):
        raise ValueError(f"insert_filler: filler_id={filler_id} occurs among the real tokens; use an id they "
                         "never take")
    real = torch.rand(B, T, generator=generator).argsort(1)[:, :R].sort(1).values  # (B, R) places of the real tokens
    inputs = torch.full((B, T), filler_id, dtype=ids.dtype).scatter_(1, real, ids)
    labels = torch.full((B, T), IGNORE, dtype=torch.long).scatter_(1, real[:, :-1], ids[:, 1:].long())
    return inputs, labels
