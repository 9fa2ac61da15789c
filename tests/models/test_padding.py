"""Where a row's pads lie, and the order that runs its real tokens as one sequence."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mixcon.models.padding import check_padding, ends_in_padding, pads_after_tokens, pads_first


def test_pads_first_moves_each_rows_pads_before_its_tokens_in_order():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]]).bool()  # right padding, left padding, gaps
    assert pads_after_tokens(mask).tolist() == [True, False, True]
    assert ends_in_padding(mask).tolist() == [True, False, True]
    assert ends_in_padding(torch.zeros(1, 4, dtype=torch.bool)).tolist() == [False]  # no token: nothing ends it
    order = pads_first(mask, fresh_cache=True)
    assert order.tolist() == [[2, 3, 0, 1], [0, 1, 2, 3], [1, 3, 0, 2]]  # stable: tokens and pads keep their order
    assert mask.gather(1, order).long().tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]
    assert pads_first(mask[:2], fresh_cache=False) is None  # right padding alone runs as it is without a cache
    assert pads_first(mask, fresh_cache=False) is not None  # a gap between tokens is moved all the same
    assert pads_first(mask[1:2], fresh_cache=True) is None  # left padding: already first


def test_check_padding_names_the_first_row_with_a_pad_after_a_token():
    cache = SimpleNamespace(key_mask=torch.zeros(3, 4, dtype=torch.bool), seqlen=0)  # nothing cached yet
    check_padding(torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 1]]).bool(), cache)  # left padding: fine
    with pytest.raises(ValueError, match=r"^attention_mask: row 1 has padding after a real token"):
        check_padding(torch.tensor([[0, 1, 1], [1, 0, 1], [1, 1, 0]]).bool(), cache)
