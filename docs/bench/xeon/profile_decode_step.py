"""Where an eager decoding step of `small` (fp32, batch 1, after a 1,024-token prompt) spends its time
(docs/benchmarks.md §23): the mean of 20 steps, then torch.profiler's self CPU time per op over 10 steps.
Usage: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/xeon/profile_decode_step.py"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mixcon import MixConConfig, MixConForCausalLM

torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("small")).eval()
ids = torch.randint(0, model.config.vocab_size, (1, 1024))
with torch.no_grad():
    cache = model.new_cache(1, max_length=1100)
    model(ids, cache=cache, logits_to_keep=1)
    token = ids[:, -1:].contiguous()
    for _ in range(5):
        model(token, cache=cache)
    start = time.perf_counter()
    for _ in range(20):
        model(token, cache=cache)
    ms = (time.perf_counter() - start) / 20 * 1e3
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}: {ms:.2f} ms per step")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            model(token, cache=cache)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
