"""Where fp32 prefill time goes (docs/benchmarks.md §13): `small` with `compile_prefill`, one prompt of T tokens
with a cache, timers around each layer's mixer and feed-forward, medians of 9 prefills after 3 warm-ups.
Usage: python prefill_parts.py T"""
import statistics
import sys
import time
from collections import defaultdict

import torch

from mixcon import MixConConfig, MixConForCausalLM

torch.manual_seed(0)
T = int(sys.argv[1])
model = MixConForCausalLM(MixConConfig.preset("small")).eval()
model.compile_prefill()
spent: dict[str, float] = defaultdict(float)


def timed(part: str, forward):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        spent[part] += time.perf_counter() - start
        return out
    return wrapper


counts: dict[str, int] = defaultdict(int)
for layer in model.layers:
    mixer = "Conba layers" if layer.mixer_kind == "conba" else "attention layers"
    ffn = "MoE layers" if layer.ffn_kind == "moe" else "dense SwiGLUs"
    layer.mixer.forward = timed(mixer, layer.mixer.forward)
    layer.ffn.forward = timed(ffn, layer.ffn.forward)
    counts[mixer] += 1
    counts[ffn] += 1

ids = torch.randint(0, model.config.vocab_size, (1, T))
runs: dict[str, list[float]] = defaultdict(list)
with torch.no_grad():
    for i in range(12):
        spent.clear()
        start = time.perf_counter()
        model(ids, cache=model.new_cache(1, max_length=T + 4), logits_to_keep=1)
        whole = time.perf_counter() - start
        if i >= 3:
            for part, seconds in spent.items():
                runs[part].append(seconds)
            runs["whole prefill"].append(whole)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, T={T}")
print("| part | ms per prefill |\n| --- | ---: |")
for part in ("Conba layers", "MoE layers", "dense SwiGLUs", "attention layers", "whole prefill"):
    ms = statistics.median(runs[part]) * 1e3
    label = part if part == "whole prefill" else f"{counts[part]} {part}"
    extra = f" ({T / ms * 1e3:,.0f} tok/s)" if part == "whole prefill" else ""
    print(f"| {label} | {ms:.0f}{extra} |")
