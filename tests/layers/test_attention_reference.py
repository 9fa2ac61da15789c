"""Attention against transformers' LlamaAttention (fp64, copied weights).

DESIGN.md §3: causal grouped-query attention through SDPA, no positional encoding by default, RoPE optional. Llama's
attention is that layer: q/k/v/o bias-free projections (mixcon's fused qkv rows are [q | k | v], head-major), scale
1/√head_dim, KV head j serving query heads j·g .. j·g+g-1 (repeat_kv), rotate-half RoPE with
inv_freq = theta^(-2i/hd). transformers' LlamaRotaryEmbedding computes angles in fp32, so the fp64 comparisons build
cos/sin in fp64 with Llama's convention (cat(freqs, freqs)) and pass them to LlamaAttention, whose own
apply_rotary_pos_emb / rotate_half does the rotating; `test_rope_angles_equal_llama_rotary_embedding` checks the
angles against LlamaRotaryEmbedding itself at fp32 precision. No RoPE = cos 1, sin 0.
"""

from __future__ import annotations

import pytest
import torch

from mixcon import MixConConfig
from mixcon.layers.attention import Attention, rope_angles
from mixcon.layers.context import ForwardContext

pytest.importorskip("transformers")

D = 48
CASES = [  # n_heads, n_kv_heads, head_dim, rope, theta
    (4, 2, 8, True, 10000.0),
    (4, 1, 8, True, 500.0),  # MQA, another theta
    (6, 2, 4, True, 10000.0),  # head_dim != d_model / n_heads
    (4, 4, 8, False, 10000.0),  # MHA without RoPE (the default)
]


def _llama():
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    except ImportError as e:
        pytest.skip(f"transformers lacks Llama's attention classes: {e}")
    return LlamaConfig, LlamaAttention, LlamaRotaryEmbedding


def _pair(nh: int, nkv: int, hd: int, rope: bool, theta: float) -> tuple[Attention, torch.nn.Module]:
    """mixcon's attention layer with O(0.3) weights and LlamaAttention holding the same weights."""
    LlamaConfig, LlamaAttention, _ = _llama()
    cfg = MixConConfig.preset("tiny", d_model=D, n_heads=nh, n_kv_heads=nkv, head_dim=hd, attn_rope=rope,
                              rope_theta=theta)
    layer = next(i for i, (mixer, _) in enumerate(cfg.layout()) if mixer == "attention")
    torch.manual_seed(0)
    ours = Attention(cfg, layer).double().eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.3)
    lc = LlamaConfig(hidden_size=D, num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd, rope_theta=theta,
                     attention_bias=False, attn_implementation="sdpa")  # sdpa: no fp32 softmax, unlike "eager"
    ref = LlamaAttention(lc, layer).double().eval()
    q, k, v = ours.qkv.weight.split([nh * hd, nkv * hd, nkv * hd])
    with torch.no_grad():
        ref.q_proj.weight.copy_(q)
        ref.k_proj.weight.copy_(k)
        ref.v_proj.weight.copy_(v)
        ref.o_proj.weight.copy_(ours.out_proj.weight)
    return ours, ref


def _cos_sin(positions: torch.Tensor, hd: int, theta: float, rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's (cos, sin) (B, T, hd) in fp64: angles repeated over the two halves."""
    if not rope:
        return (torch.ones(*positions.shape, hd, dtype=torch.float64),
                torch.zeros(*positions.shape, hd, dtype=torch.float64))
    freqs = positions[..., None].double() / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _left_padded(B: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded mask (B, T), each token's position (counting real tokens from 0, as generate gives them), and
    Llama's boolean (B, 1, T, T) mask: causal, pad keys hidden (a pad query sees itself so no row is empty)."""
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3] = False
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & mask[:, None, None, :]
    return mask, positions, allowed | torch.eye(T, dtype=torch.bool)


@pytest.mark.parametrize("nh,nkv,hd,rope,theta", CASES)
def test_causal_forward_equals_llama_attention(nh, nkv, hd, rope, theta):
    """Catches: interleaved (GPT-J) RoPE for rotate-half, theta ignored, GQA heads grouped by `repeat` instead of
    `repeat_interleave`, the qkv split in another order, a scale other than 1/√hd, no causal mask."""
    ours, ref = _pair(nh, nkv, hd, rope, theta)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    with torch.no_grad():
        want, _ = ref(x, position_embeddings=_cos_sin(torch.arange(7)[None].expand(2, 7), hd, theta, rope),
                      attention_mask=None)
        torch.testing.assert_close(ours(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nh,nkv,hd,rope,theta", CASES[:2])
def test_left_padding_equals_llama_attention_with_its_mask(nh, nkv, hd, rope, theta):
    """Real tokens of a left-padded batch. Catches pad keys attended to, RoPE positions counted from the row start
    (pads included) rather than from the first real token."""
    ours, ref = _pair(nh, nkv, hd, rope, theta)
    mask, positions, allowed = _left_padded(2, 7)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    with torch.no_grad():
        got = ours(x, ForwardContext.build(mask, 2, 7, None, x.device))
        want, _ = ref(x, position_embeddings=_cos_sin(positions, hd, theta, rope), attention_mask=allowed)
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nh,nkv,hd,rope,theta", CASES)
def test_gradients_of_a_left_padded_batch_equal_llama_attention(nh, nkv, hd, rope, theta):
    """Gradients of the input and of both projections from the real tokens' outputs, left padding included (the
    training forward, not `no_grad`). Catches a detached K/V or RoPE, pads that leak into real tokens' gradients."""
    ours, ref = _pair(nh, nkv, hd, rope, theta)
    mask, positions, allowed = _left_padded(2, 7)
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, D, dtype=torch.float64) * mask[..., None]  # real tokens' outputs only
    got = torch.autograd.grad((ours(x, ForwardContext.build(mask, 2, 7, None, x.device)) * g).sum(),
                              [x, ours.qkv.weight, ours.out_proj.weight])
    out, _ = ref(x, position_embeddings=_cos_sin(positions, hd, theta, rope), attention_mask=allowed)
    want = torch.autograd.grad((out * g).sum(), [x, ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight,
                                                 ref.o_proj.weight])
    want = [want[0], torch.cat(want[1:4]), want[4]]  # mixcon's fused qkv rows are [q | k | v]
    for name, a, b in zip(["input", "qkv", "out_proj"], got, want, strict=True):
        assert float(b.norm()) > 0, name
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=name)


def test_rope_angles_equal_llama_rotary_embedding():
    """mixcon's angles against LlamaRotaryEmbedding's own cos/sin (fp32 there: tolerance 1e-6). Catches another
    inv_freq (theta^(-i/hd), the index not doubled, theta ignored) or a half-layout mismatch."""
    LlamaConfig, _, LlamaRotaryEmbedding = _llama()
    hd, theta = 8, 500.0
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=hd, rope_theta=theta))
    positions = torch.tensor([[0, 1, 2, 7, 40], [3, 4, 5, 6, 9]])
    cos_ref, sin_ref = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_angles(positions, hd, theta, torch.float64)  # (B, 1, T, hd/2)
    torch.testing.assert_close(torch.cat([cos[:, 0], cos[:, 0]], -1).float(), cos_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([sin[:, 0], sin[:, 0]], -1).float(), sin_ref, rtol=1e-6, atol=1e-6)
