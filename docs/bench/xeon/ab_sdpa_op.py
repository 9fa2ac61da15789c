"""Compiled decoding steps of `small` and its Transformer twin with decode attention as inductor handles SDPA vs as
an opaque custom op (the eager SDPA kernel); same weights, alternating rounds, medians of 8 x 10 steps.
Usage: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/xeon/ab_sdpa_op.py CONTEXT"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import mixcon.layers.attention as att
from mixcon import MixConConfig, MixConForCausalLM
from mixcon.benchmarks import common


@torch.library.custom_op("abtest::sdpa_decode", mutates_args=())
def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

@sdpa_decode.register_fake
def _(q, k, v, mask):
    return q.new_empty(q.shape)

orig = att.decode_attention
def opaque(q, k, v, mask, use_sdpa=None):
    B, nh, _, hd = q.shape
    nkv = k.shape[1]
    return sdpa_decode(q.reshape(B, nkv, nh // nkv, hd), k, v, mask).reshape(B, nh, 1, hd)

ctx = int(sys.argv[1])
torch.manual_seed(0)
base = MixConConfig.preset("small")
res = {}
ids = torch.randint(0, base.vocab_size, (1, ctx))
for name in ("mixcon", "transformer-twin"):
    config = common.twins(base)[name]
    for variant in ("inductor", "opaque"):
        att.decode_attention = orig if variant == "inductor" else opaque
        torch._dynamo.reset()
        torch.manual_seed(1)
        m = MixConForCausalLM(config).eval()
        with torch.no_grad():
            m.compile_decode()
            cache = m.new_cache(1, max_length=ctx + 200)
            m(ids, cache=cache, logits_to_keep=1)
            tok = ids[:, -1:]
            for _ in range(3):
                m(tok, cache=cache)
            logits = m(tok, cache=cache)
            res[name, variant] = (m, cache, tok, logits)
att.decode_attention = orig
# the two variants give the same logits
for name in ("mixcon", "transformer-twin"):
    a, b = res[name, "inductor"][3].logits, res[name, "opaque"][3].logits
    print(name, "max |diff| logits", float((a - b).abs().max()))
times = {k: [] for k in res}
with torch.no_grad():
    for _ in range(8):
        for k, (m, cache, tok, _) in res.items():
            att.decode_attention = orig if k[1] == "inductor" else opaque  # (the first round recompiles: the models
            # share decode_step's code object and each dynamo reset above dropped the graphs compiled before it)
            t = time.perf_counter()
            for _ in range(10):
                m(tok, cache=cache)
            times[k].append((time.perf_counter() - t) / 10 * 1e3)
for k, ts in times.items():
    print(f"ctx {ctx} {k[0]:18s} {k[1]:9s} {statistics.median(ts):6.2f} ms")
