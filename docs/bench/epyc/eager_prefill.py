"""Eager prefill of a long prompt without autograd (docs/benchmarks.md §19): seconds and peak memory.

usage: python eager_prefill.py T [small|tiny] [repeats]
One process per call: the rise of the peak resident memory (ru_maxrss, Linux) over the size before the first
prefill, and the median seconds of `repeats` prefills (`model(ids, cache=..., logits_to_keep=1)`, fp32)."""

import json
import os
import resource
import statistics
import sys
import time

import torch

from mixcon import MixConConfig, MixConForCausalLM

T = int(sys.argv[1])
name = sys.argv[2] if len(sys.argv) > 2 else "small"
repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset(name)).eval()
ids = torch.randint(0, model.config.vocab_size, (1, T))
with torch.no_grad():
    model(ids[:, :64])  # lazy initialisations out of the way
with open("/proc/self/statm") as statm:
    base = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
times = []
with torch.no_grad():
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids, cache=model.new_cache(1, max_length=T), logits_to_keep=1)
        times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
median = statistics.median(times)
print(json.dumps({"T": T, "model": name, "threads": torch.get_num_threads(), "median_s": round(median, 3),
                  "tokens_per_s": round(T / median), "peak_rise_MB": round((peak - base) / 2**20, 1)}))
