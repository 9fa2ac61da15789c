"""In-process A/B on the Intel Xeon (docs/benchmarks.md §23): `small` (fp32) eager decoding steps with the Conba
layer and scan step of commit a302635 ("before": k and q normalised apart, the D skip and the delayed read as
multiply + add, the conv taps copied per token) vs the working tree ("after"). The old methods are read from git
and swapped in; variants alternate; medians of the last 12 of 15 rounds of 5 steps at the same position.
Usage (in a git checkout): python docs/bench/xeon/ab_fewer_ops.py"""
import statistics
import time

import torch
from old_code import old_module

import mixcon.layers.conba as new_conba
from mixcon import MixConConfig, MixConForCausalLM

BEFORE = "a302635"


old_conba = old_module(BEFORE, "mixcon/layers/conba.py")
old_conba.conba_scan_step = old_module(BEFORE, "mixcon/ops/step.py").conba_scan_step
METHODS = ("_scan_inputs", "_finish", "decode", "_conv")
VARIANTS = {"before": {m: getattr(old_conba.Conba, m) for m in METHODS},
            "after": {m: getattr(new_conba.Conba, m) for m in METHODS}}


def use(name: str) -> None:
    for method, fn in VARIANTS[name].items():
        setattr(new_conba.Conba, method, fn)


torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("small")).eval()
V = model.config.vocab_size


def median_ms(B: int, context: int, rounds: int = 15, steps: int = 5) -> dict[str, float]:
    ids = torch.randint(0, V, (B, context))
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with torch.no_grad():
        cache = model.new_cache(B, max_length=context + 8)
        model(ids, cache=cache, logits_to_keep=1)
        token = ids[:, -1:].contiguous()
        for r in range(rounds):
            for name in (list(VARIANTS) if r % 2 else list(VARIANTS)[::-1]):
                use(name)
                start = time.perf_counter()
                for _ in range(steps):
                    model(token, cache=cache)
                    cache.seqlen -= 1  # decode the same position again
                    cache.positions -= 1
                    for layer in cache.layers:
                        if hasattr(layer, "ptr"):
                            layer.ptr = (layer.ptr - 1) % len(layer.slots)
                times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t[3:]) * 1e3 for name, t in times.items()}


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
print("B  context  before ms  after ms  ratio")
for B, context in [(1, 1024), (1, 16384), (4, 1024)]:
    r = median_ms(B, context)
    print(f"{B:<2} {context:<8} {r['before']:9.2f} {r['after']:9.2f}  {r['before'] / r['after']:.3f}x")
use("after")
