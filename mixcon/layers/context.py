"""What every layer of one forward call needs to know besides its input."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from mixcon.checks import check_dtype
from mixcon.generation.cache import MixConCache


@dataclass
class ForwardContext:
    """The padding, positions, attention mask, documents and cache of one forward call, shared by its layers."""

    token_mask: torch.Tensor | None  # (B, T) bool: True for real tokens, False for padding; None = all real
    positions: torch.Tensor  # (B, T) long: position of each token in its own sequence (RoPE)
    causal: bool  # attention is plain causal over the T new tokens (SDPA's is_causal), or one token sees all keys
    key_valid: torch.Tensor | None = None  # (B, offset + T) bool: keys that are not padding; None = all
    cache: MixConCache | None = None
    offset: int = 0  # positions already in the cache
    seq_idx: torch.Tensor | None = None  # (B, T) long: document of each token (packed rows); None = one
    _memo: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    def memo(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """`make()`, computed once per forward call and shared by the layers that ask with `key`."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @classmethod
    def build(cls, token_mask: torch.Tensor | None, B: int, T: int, cache: MixConCache | None,
              device: torch.device, seq_idx: torch.Tensor | None = None) -> ForwardContext:
        """Positions and what attention may see for T new tokens after what `cache` holds.

        With a cache, its `key_mask` must already mark the T new positions. `seq_idx` (packed
        documents; no cache, no padding) masks attention across documents.
        """
        if token_mask is not None and bool(token_mask.all()):
            token_mask = None
        if seq_idx is not None and bool((seq_idx == seq_idx[:, :1]).all()):
            seq_idx = None  # one document per row: the plain causal forward
        if seq_idx is not None:
            assert cache is None and token_mask is None, "seq_idx: no cache, no padding (the model checks)"
            # RoPE needs no restart at a document start: attention scores depend on relative positions only.
            return cls(None, torch.arange(T, device=device)[None].expand(B, T), False, seq_idx=seq_idx)
        offset = cache.seqlen if cache is not None else 0
        start = cache.positions[:, None] if cache is not None else 0
        if token_mask is None:
            positions = start + torch.arange(T, device=device)[None, :]
        else:
            positions = start + (token_mask.long().cumsum(1) - 1).clamp(min=0)
        key_valid = cache.key_mask[:, : offset + T] if cache is not None else token_mask
        if key_valid is not None and token_mask is None and bool(key_valid[:, :offset].all()):
            key_valid = None  # no padding among the keys
        causal = key_valid is None and (offset == 0 or T == 1)  # SDPA's own causal mask (or none) is exact
        return cls(token_mask, positions.expand(B, T), causal, key_valid, cache, offset)

    def attention_mask(self, start: int, end: int) -> torch.Tensor | None:
        """What new tokens start..end-1 may attend to: (B or 1, 1, end - start, offset + end) bool over the keys up to
        the last of them (those after it are in their future), or None when `causal` holds. Pad keys are never
        seen (a pad query sees itself, so that no row is empty); keys of another document neither."""
        if self.causal:
            return None
        device = self.positions.device
        rows = torch.arange(start, end, device=device)[:, None] + self.offset  # absolute query positions
        cols = torch.arange(self.offset + end, device=device)[None, :]
        allowed = (cols <= rows)[None]  # (1, end - start, Tk)
        if self.seq_idx is not None:
            allowed = allowed & (self.seq_idx[:, start:end, None] == self.seq_idx[:, None, :end])
        if self.key_valid is not None:
            allowed = allowed & (self.key_valid[:, None, : self.offset + end] | (cols == rows)[None])
        return allowed[:, None]


class DecodeStep(NamedTuple):
    """What every layer of one decoding step (one new token per row) needs; tensors only, so that a
    compiled step does not specialise on Python values."""

    index: torch.Tensor  # (1,) long: the cache position the new token is written to
    key_mask: torch.Tensor  # (B, 1, 1, L) bool: cache positions the new token may attend to (L: the capacity
    # when compiled, the filled positions when eager)
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin at the new positions: (B, 1, 1, hd / 2)


def check_input(layer: str, h: torch.Tensor, d_model: int, dtype: torch.dtype) -> None:
    """A mixer's input must be (B, T, d_model), in its weights' dtype unless autocast runs."""
    if h.dim() != 3 or h.shape[-1] != d_model:
        raise ValueError(f"{layer}: input must be (B, T, d_model={d_model}), got shape {tuple(h.shape)}")
    check_dtype(layer, h, dtype)
