"""In-process A/B of eager decoding steps of `small` (fp32, CPU) under torch.no_grad vs torch.inference_mode
(docs/benchmarks.md §35): after one prefill, steps alternate between the two modes on the same cache (the ops are
the same; inference_mode skips autograd's dispatch step and version counters); median of 150 steps per mode.
Usage: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/epyc/ab_inference_mode.py"""
import statistics
import time

import torch

from mixcon import MixConConfig, MixConForCausalLM

torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("small")).eval()
steps = 300
print("batch  context  no_grad ms  inference_mode ms  speed-up")
for B, context in [(1, 1024), (1, 4096), (4, 1024)]:
    ids = torch.randint(0, model.config.vocab_size, (B, context))
    with torch.no_grad():
        cache = model.new_cache(B, max_length=context + steps)
        token = model(ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    times = {torch.no_grad: [], torch.inference_mode: []}
    for step in range(steps):
        mode = torch.inference_mode if step % 2 else torch.no_grad
        with mode():
            start = time.perf_counter()
            logits = model(token, cache=cache).logits
            times[mode].append(time.perf_counter() - start)
        token = logits[:, -1:].argmax(-1)
    a, b = (statistics.median(t[10:]) * 1e3 for t in times.values())
    print(f"{B:5d}  {context:7d}  {a:10.2f}  {b:17.2f}  {a / b:7.2f}x", flush=True)
