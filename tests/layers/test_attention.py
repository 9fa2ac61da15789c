"""Attention for one new token: both decode paths equal SDPA with per-head expanded K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixcon.layers.attention import decode_attention


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "matmul"])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_equals_expanded_sdpa(use_sdpa, masked):
    torch.manual_seed(0)
    B, nh, nkv, Tk, hd = 3, 6, 2, 37, 16
    q = torch.randn(B, nh, 1, hd, dtype=torch.float64)
    k, v = torch.randn(2, B, nkv, Tk, hd, dtype=torch.float64)
    mask = None
    if masked:  # left padding: each row's first keys are pads
        mask = torch.arange(Tk)[None, None, None, :] >= torch.tensor([0, 5, 20])[:, None, None, None]
    expand = nh // nkv  # query head i reads KV head i // expand
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(expand, 1), v.repeat_interleave(expand, 1),
                                         attn_mask=mask)
    out = decode_attention(q, k, v, mask, use_sdpa=use_sdpa)
    assert out.shape == (B, nh, 1, hd)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
