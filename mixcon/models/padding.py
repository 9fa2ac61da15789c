"""Padding in a batch of rows: where a row's pads lie, and the order that runs its real tokens as one sequence."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mixcon.generation.cache import MixConCache


def pads_after_tokens(mask: torch.Tensor) -> torch.Tensor:
    """(B,): whether each row of a (B, T) bool mask has a pad right after a real token (right padding, or a gap)."""
    return (mask[:, :-1] & ~mask[:, 1:]).any(1)


def ends_in_padding(mask: torch.Tensor) -> torch.Tensor:
    """(B,): whether each row of a (B, T) bool mask has real tokens and a pad after its last one (right padding)."""
    return mask.any(1) & ~mask[:, -1]


def pads_first(mask: torch.Tensor, fresh_cache: bool) -> torch.Tensor | None:
    """(B, T) gather indices that move each row's pads before its real tokens, in order, or None where no row
    needs it: a row whose pads all come first, or (without a cache to fill) all after its last token, is run as
    it is. The Conba layers step over leading pads exactly; moved there, pads between real tokens (PEFT's
    virtual tokens before left padding) or after them (a cache to continue) do not take a place in the
    conv window, the delay's τ steps or the cache."""
    if not bool(pads_after_tokens(mask).any()):
        return None
    m = mask.long()
    gaps = (m.diff(dim=1, prepend=m.new_zeros(m.shape[0], 1)) == 1).sum(1) > 1  # more than one run of tokens
    if not fresh_cache and not bool(gaps.any()):
        return None
    return m.argsort(dim=1, stable=True)


def check_padding(mask: torch.Tensor, cache: MixConCache) -> None:
    """Padding (mask (B, T) False) where a forward continues a cache: only before a row's first real token,
    so that the row's pads so far and these come first (a pad after a real token would take a place in the
    conv window and the delay's τ steps)."""
    bad = pads_after_tokens(mask) | (cache.key_mask[:, : cache.seqlen].any(1) & ~mask.all(1))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"attention_mask: row {row} has padding after a real token (in this call or in the cache it "
            "continues); a forward that continues a cache takes pads only before a row's first token (left "
            "padding, as generate uses)")
