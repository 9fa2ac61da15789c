"""A/B of the `small` training step (8 x 512 tokens, AdamW) with Conba chunks of 64 and 32 steps, the
two models taking turns in one process; prints the median seconds per step of each.

GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/xeon/ab_chunk.py [--compile]
"""

import statistics
import sys
import time

import torch

from mixcon import MixConConfig, MixConForCausalLM

compiled = "--compile" in sys.argv[1:]
runs = {}
for chunk in (64, 32):
    torch.manual_seed(0)
    model = MixConForCausalLM(MixConConfig.preset("small", conba_chunk=chunk))
    if compiled:
        for layer in model.layers:
            layer.compile()
    runs[chunk] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
ids = torch.randint(0, 8192, (8, 513))


def step(chunk: int) -> float:
    model, opt = runs[chunk]
    start = time.perf_counter()
    model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


for chunk in runs:
    step(chunk), step(chunk)  # warm-up (and compilation)
times: dict[int, list[float]] = {chunk: [] for chunk in runs}
for r in range(8):
    for chunk in (32, 64) if r % 2 else (64, 32):
        times[chunk].append(step(chunk))
print("compiled" if compiled else "eager", {chunk: round(statistics.median(t), 3) for chunk, t in times.items()})
