"""Attention: both one-token decode paths equal SDPA with per-head expanded K/V; RoPE turns pairs by angle."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from mixcon import MixConConfig
from mixcon.layers.attention import Attention, apply_rope, decode_attention, rope_angles


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


def test_decode_attention_in_fp16_scales_before_the_product():
    """q·kᵀ of 76,800 is past fp16's range (65,504); scaled by 1/√hd first, as SDPA does, it is not."""
    q = torch.full((1, 2, 1, 64), 40.0)
    k = torch.full((1, 1, 3, 64), 30.0)
    v = torch.randn(1, 1, 3, 64)
    ref = decode_attention(q, k, v, None, use_sdpa=False)
    out = decode_attention(q.half(), k.half(), v.half(), None, use_sdpa=False)
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_pads_non_finite_state_reaches_no_real_position(poisoned_pads, bad):
    """A pad's keys and values are masked; non-finite ones must not reach a real query through 0 weights
    (nan · 0 = nan)."""
    cfg = MixConConfig.preset("tiny")
    want, got = poisoned_pads(Attention(cfg, 0), cfg.d_model, bad)
    torch.testing.assert_close(got, want)


def test_an_input_of_another_shape_is_refused_by_shape():
    layer = Attention(MixConConfig.preset("tiny"), 0)
    for shape in ((5, 32), (1, 5, 33)):
        with pytest.raises(ValueError, match=rf"Attention: input must be \(B, T, d_model=32\), got shape "
                                             rf"{re.escape(str(shape))}"):
            layer(torch.randn(shape))


def test_the_printed_layer_shows_its_heads_and_rope():
    config = MixConConfig.preset("tiny")
    assert f"heads={config.n_heads}, kv_heads={config.n_kv_heads}, head_dim={config.attn_head_dim}, rope=False" \
        in repr(Attention(config, 0))
    assert "rope_theta=500.0" in repr(Attention(config.replace(attn_rope=True, rope_theta=500.0), 0))


def test_rope_rotates_pairs_by_position_times_frequency():
    """Each (x_i, x_{i+hd/2}) pair turns like a complex number by position · theta^(-2i/hd)."""
    B, T, hd, theta = 2, 5, 8, 100.0
    x = torch.randn(B, 3, T, hd, dtype=torch.float64)
    positions = torch.randint(0, 1000, (B, T))
    cos, sin = rope_angles(positions, hd, theta, torch.float64)
    y = apply_rope(x, cos, sin)
    freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    turn = torch.polar(torch.ones(B, 1, T, hd // 2, dtype=torch.float64), positions[:, None, :, None] * freq)
    expected = torch.complex(*x.chunk(2, dim=-1)) * turn
    torch.testing.assert_close(y, torch.cat([expected.real, expected.imag], dim=-1))
    # Scores depend on relative position only.
    q, k = torch.randn(2, 1, 1, 1, hd, dtype=torch.float64)
    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rope(q, *rope_angles(torch.tensor([[m]]), hd, theta, torch.float64))
        kn = apply_rope(k, *rope_angles(torch.tensor([[n]]), hd, theta, torch.float64))
        return (qm * kn).sum()
    torch.testing.assert_close(score(7, 3), score(107, 103))


def test_masked_attention_in_query_blocks_equals_one_block(tiny_model, monkeypatch):
    """Padding, packed documents and a cache continued by several tokens: attention in blocks of 4 queries, each
    over the keys up to its last query, equals one SDPA call over the whole (T, T) mask."""
    from mixcon.layers import attention
    from mixcon.layers.context import ForwardContext

    model = tiny_model()
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    seq_idx = torch.tensor([[0] * 4 + [1] * 7, [0] * 9 + [1] * 2])

    def run():
        with torch.no_grad():
            cache = model.new_cache(2)
            model(ids[:, :5], cache=cache)
            return (model(ids, attention_mask=mask).logits, model(ids, seq_idx=seq_idx).logits,
                    model(ids[:, 5:], cache=cache).logits)

    whole = run()
    shapes = []
    build = ForwardContext.attention_mask
    monkeypatch.setattr(ForwardContext, "attention_mask",
                        lambda ctx, s, e: shapes.append(tuple(m.shape)) or m if (m := build(ctx, s, e)) is not None
                        else None)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 4)
    for got, want in zip(run(), whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    n_attention = sum(layer.mixer_kind == "attention" for layer in model.layers)
    blocks = [(2, 1, 4, 4), (2, 1, 4, 8), (2, 1, 3, 11)]  # queries 0-3, 4-7, 8-10 over the keys up to their last
    continued = [(1, 1, 4, 9), (1, 1, 2, 11)]  # 6 new tokens after 5 (no padding: one mask for every row)
    assert shapes == (blocks * n_attention) * 2 + continued * n_attention  # padded, packed, continued


def test_the_mask_hides_pad_keys_but_a_pad_query_sees_itself():
    """No row of the mask is empty (an empty row's softmax is nan on some backends): a pad query sees its own key,
    a real query every real key up to itself and no pad."""
    from mixcon.layers.context import ForwardContext

    ctx = ForwardContext.build(torch.tensor([[False, True, True], [True, True, True]]), 2, 3, None, torch.device("cpu"))
    padded, full = ctx.attention_mask(0, 3)[:, 0].tolist()
    assert padded == [[True, False, False], [False, True, False], [False, True, True]]
    assert full == [[True, False, False], [True, True, False], [True, True, True]]


def test_a_model_without_attention_builds_no_mask(tiny_model, monkeypatch):
    """The mask is attention's: a pure-Conba model given left padding never builds one (it was (B, 1, T, T))."""
    from mixcon.layers.context import ForwardContext

    model = tiny_model(attn_per_block=0)
    monkeypatch.setattr(ForwardContext, "attention_mask", lambda *a: pytest.fail("a mask was built"))
    contexts = []
    build = ForwardContext.build
    monkeypatch.setattr(ForwardContext, "build", lambda *a, **kw: contexts.append(build(*a, **kw)) or contexts[-1])
    ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask)
        model.generate(ids, 3, attention_mask=mask)
    # and the context holds nothing of (T, T) size: at most a (B, keys) row per sequence
    assert contexts and all(value.numel() <= 2 * 12 for ctx in contexts for value in vars(ctx).values()
                            if isinstance(value, torch.Tensor))
