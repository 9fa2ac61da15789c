"""The pure-Conba twin of `small`: compiled decoding steps after a 1K and a 32K prompt, interleaved in one process
(4 rounds of 32 tokens each; docs/benchmarks.md §37)."""

import statistics

import torch

from mixcon.benchmarks.decode import time_generation, twins
from mixcon.config import MixConConfig
from mixcon.models.mixcon import MixConForCausalLM

torch.manual_seed(0)
model = MixConForCausalLM(twins(MixConConfig.preset("small"))["conba-twin"]).eval()
model.compile_decode()
model.compile_prefill()
for n in (8, 16):  # as `bench decode` warms up: compiled for the first capacity, then with it dynamic
    time_generation(model, torch.randint(0, 8192, (1, n)), 2)
prompts = {T: torch.randint(0, 8192, (1, T)) for T in (1024, 32768)}
for ids in prompts.values():
    time_generation(model, ids, 1)
gaps: dict[int, list[float]] = {T: [] for T in prompts}
for r in range(4):
    for T, ids in prompts.items():
        _, later, _ = time_generation(model, ids, 32)
        gaps[T] += later
        print(r, T, round(statistics.median(later) * 1e3, 3), flush=True)
for T in prompts:
    print(T, "median ms", statistics.median(gaps[T]) * 1e3)
print("ratio", statistics.median(gaps[32768]) / statistics.median(gaps[1024]))
