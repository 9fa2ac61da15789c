"""Causal grouped-query attention via scaled_dot_product_attention, optional RoPE, KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixcon.config import MixConConfig
from mixcon.generation.cache import AttentionCache
from mixcon.layers.context import DecodeStep, ForwardContext, check_input
from mixcon.layers.linear import Linear
from mixcon.ops.dtypes import compute_dtype

# Queries per SDPA call when attention needs an explicit mask (padding, packed documents, a cache continued by
# several tokens): the mask, and SDPA's float copy of it, hold a block's rows only, not (T, T).
QUERY_BLOCK = 1024


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles at positions (B, T): each (B, 1, T, head_dim / 2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    angles = positions.to(dtype)[:, None, :, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, hd) by `rope_angles` (rotate-half convention)."""
    x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def decode_attention(
    q: torch.Tensor,  # (B, nh, 1, hd): one new token
    k: torch.Tensor,  # (B, nkv, Tk, hd)
    v: torch.Tensor,  # (B, nkv, Tk, hd)
    mask: torch.Tensor | None,  # (B or 1, 1, 1, Tk) bool, True = may attend
    use_sdpa: bool | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ / √hd) v for one query per head: (B, nh, 1, hd).

    The query heads of a KV group become that group's rows, so K and V are read once, not expanded
    per head. SDPA does it on a CPU (its fused kernel is 1.5–2× faster than two matmuls there); on
    CUDA (`use_sdpa=None` picks) two plain matmuls, because SDPA's cuDNN backend plans anew for
    every key length (~16 ms of host time per call measured on an H100).
    """
    B, nh, _, hd = q.shape
    nkv = k.shape[1]
    qg = q.reshape(B, nkv, nh // nkv, hd)
    if use_sdpa is None:
        use_sdpa = q.device.type != "cuda"
    if use_sdpa:
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).reshape(B, nh, 1, hd)
    scores = ((qg * hd**-0.5) @ k.transpose(-1, -2)).to(compute_dtype(q))  # (B, nkv, nh/nkv, Tk); scaled
    # first, as SDPA does, so that fp16 holds what the softmax reads
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).reshape(B, nh, 1, hd)


class Attention(nn.Module):
    """Causal grouped-query attention (DESIGN §3): n_heads queries over n_kv_heads keys and values, RoPE optional,
    through SDPA; caches K and V for decoding."""

    def __init__(self, config: MixConConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = config.n_heads, config.n_kv_heads, config.attn_head_dim
        self.rope_theta = config.rope_theta if config.attn_rope else None
        self.qkv = Linear(config.d_model, (self.n_heads + 2 * self.n_kv) * self.hd, bias=False)
        self.out_proj = Linear(self.n_heads * self.hd, config.d_model, bias=False)

    def extra_repr(self) -> str:
        rope = f"rope_theta={self.rope_theta}" if self.rope_theta is not None else "rope=False"
        return f"heads={self.n_heads}, kv_heads={self.n_kv}, head_dim={self.hd}, {rope}"

    def _project(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, d_model) -> q (B, nh, T, hd), k and v (B, nkv, T, hd); q and k rotated together."""
        B, T, _ = h.shape
        qk, v = self.qkv(h).split([(self.n_heads + self.n_kv) * self.hd, self.n_kv * self.hd], dim=-1)
        qk = qk.view(B, T, self.n_heads + self.n_kv, self.hd).transpose(1, 2)  # (B, nh + nkv, T, hd)
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.split([self.n_heads, self.n_kv], dim=1)
        return q, k, v.view(B, T, self.n_kv, self.hd).transpose(1, 2)

    def forward(self, h: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model); `ctx` carries padding, positions and the cache."""
        check_input("Attention", h, self.qkv.in_features, self.qkv.weight.dtype)
        B, T, _ = h.shape
        if ctx is None:
            ctx = ForwardContext.build(None, B, T, None, h.device)
        rope = None
        if self.rope_theta is not None:  # angles shared across layers
            rope = ctx.memo(("rope", self.hd, self.rope_theta), lambda: rope_angles(
                ctx.positions, self.hd, self.rope_theta, compute_dtype(h)))
        q, k, v = self._project(h, rope)
        if ctx.token_mask is not None:  # pads' keys and values are masked out, and nothing non-finite of theirs
            keep = ctx.token_mask[:, None, :, None]  # reaches a real query through 0 weights: (B, 1, T, 1)
            k, v = k.masked_fill(~keep, 0), v.masked_fill(~keep, 0)
        if ctx.cache is not None:
            layer_cache = ctx.cache.layers[self.layer_idx]
            assert isinstance(layer_cache, AttentionCache)
            k, v = layer_cache.update(k, v, ctx.offset)
        gqa = self.n_kv != self.n_heads
        if T == 1:
            y = decode_attention(q, k, v, ctx.attention_mask(0, 1))
        elif ctx.causal:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # a mask, built per block of queries over the keys up to the block's last: memory O(block · keys)
            blocks = []
            for start in range(0, T, QUERY_BLOCK):
                end = min(start + QUERY_BLOCK, T)
                keys = ctx.offset + end
                blocks.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :keys], v[:, :, :keys],
                                                             attn_mask=ctx.attention_mask(start, end), enable_gqa=gqa))
            y = torch.cat(blocks, dim=2) if len(blocks) > 1 else blocks[0]
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))

    def decode(self, h: torch.Tensor, cache: tuple[torch.Tensor, ...], step: DecodeStep) -> torch.Tensor:
        """One new token per row, (B, 1, d_model) -> (B, 1, d_model): K, V written at `step.index` of
        the cache (K, V), then attention over them (the whole capacity, or its filled part) under `step.key_mask`."""
        k_cache, v_cache = cache
        q, k, v = self._project(h, step.rope)
        k_cache.index_copy_(2, step.index, k.to(k_cache.dtype))  # under autocast k, v are bf16
        v_cache.index_copy_(2, step.index, v.to(v_cache.dtype))
        y = decode_attention(q, k_cache, v_cache, step.key_mask)  # (B, nh, 1, hd)
        return self.out_proj(y.reshape(h.shape[0], 1, self.n_heads * self.hd))
