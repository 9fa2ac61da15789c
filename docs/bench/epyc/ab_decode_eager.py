"""In-process A/B of two eager-decoding changes on `small` (fp32, CPU), variants alternating, medians of the
last 12 of 15 rounds per case:
(1) attention over the filled K/V positions only vs over the cache's whole capacity (what a compiled step
    reads), for a short prompt in the room `generate` reserves (prompt + 4096) and for a cache that grew
    by doubling (the transformers wrapper's before it reserved room);
(2) a decoding step's MoE on many tokens grouped by expert vs every expert on every token.
Usage: python ab_decode_eager.py (ab_decode_matvec.py imports its model and `median_ms`)"""
import statistics
import time

import torch

import mixcon.layers.moe as moe
from mixcon import MixConConfig, MixConForCausalLM

torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("small")).eval()
V = model.config.vocab_size


def median_ms(cases: dict, B: int, context: int, capacity: int, rounds: int = 15) -> dict:
    """Per-token time of each variant: a function setting it up, then one decoding step on a prefilled cache."""
    ids = torch.randint(0, V, (B, context))
    times = {name: [] for name in cases}
    with torch.no_grad():
        cache = model.new_cache(B, max_length=capacity)
        model(ids, cache=cache, logits_to_keep=1)
        token = ids[:, -1:].contiguous()
        for r in range(rounds):
            for name in (list(cases) if r % 2 else list(cases)[::-1]):
                cases[name]()
                start = time.perf_counter()
                model(token, cache=cache)
                times[name].append(time.perf_counter() - start)
                cache.seqlen -= 1  # decode the same position again (the cache does not move on)
                cache.positions -= 1
                for layer in cache.layers:
                    if hasattr(layer, "ptr"):
                        layer.ptr = (layer.ptr - 1) % len(layer.slots)
    model._decode_step = None
    moe.static_shapes = STATIC
    return {name: statistics.median(t[3:]) * 1e3 for name, t in times.items()}


def whole_capacity() -> None:  # a step function set: _decode passes the whole capacity, as for a compiled one
    model._decode_step = model.decode_step


def filled_only() -> None:
    model._decode_step = None


STATIC = moe.static_shapes


def dense() -> None:
    moe.static_shapes = lambda h: True


def grouped() -> None:
    moe.static_shapes = STATIC


if __name__ == "__main__":
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("(1) attention in eager decoding: B  context  capacity  whole ms  filled ms  ratio")
    for B, context, capacity in [(1, 128, 128 + 4096), (1, 4096, 8192), (1, 16384, 32768), (8, 128, 128 + 4096)]:
        r = median_ms({"whole": whole_capacity, "filled": filled_only}, B, context, capacity)
        ratio = r["whole"] / r["filled"]
        print(f"    {B:<3} {context:<7} {capacity:<8} {r['whole']:9.2f} {r['filled']:9.2f}  {ratio:.2f}x")
    print("(2) MoE in eager decoding: B  all-experts ms  grouped ms  ratio")
    for B in (8, 64, 256):
        r = median_ms({"dense": dense, "grouped": grouped}, B, 128, 256)
        print(f"    {B:<4} {r['dense']:9.2f} {r['grouped']:9.2f}  {r['dense'] / r['grouped']:.2f}x")
