"""One AdamW step over the `small` preset's parameters (43.7M, fp32, random gradients), torch's three forms taking
turns in one process: foreach (torch's default on a CPU), fused (what `build_optimizer` takes since §39), and the
per-parameter loop; medians of 10 steps after 2 rounds of warm-up (docs/benchmarks.md §39).
Usage: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/xeon-avx512/adamw_fused.py"""
import statistics
import time

import torch

from mixcon import MixConConfig, MixConForCausalLM

torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("small"))
for p in model.parameters():
    p.grad = torch.randn_like(p) * 1e-3
forms = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}
optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, **kw) for name, kw in forms.items()}
times: dict[str, list[float]] = {name: [] for name in forms}
for r in range(12):
    for name, opt in optimizers.items():
        start = time.perf_counter()
        opt.step()
        if r >= 2:
            times[name].append(time.perf_counter() - start)
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
      f"{sum(p.numel() for p in model.parameters()):,} parameters")
for name, t in times.items():
    print(f"{name:>9}: {statistics.median(t) * 1e3:6.1f} ms per step")
