"""Where an eager training step of `small` (8 x 512 tokens, fp32, AdamW) spends its time (docs/benchmarks.md §23):
the median of 3 timed steps after 2 warm-up steps, then torch.profiler's self CPU time per op over one step,
and the time of the elementwise products and subtractions by input shape.
Usage: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/xeon/profile_train_step.py"""
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mixcon import MixConConfig, MixConForCausalLM

torch.manual_seed(0)
config = MixConConfig.preset("small")
model = MixConForCausalLM(config)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, config.vocab_size, (8, 513))


def step() -> None:
    model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


step()
step()
seconds = []
for _ in range(3):
    start = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - start)
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}: step {statistics.median(seconds):.3f} s "
      f"(median of {[round(s, 3) for s in seconds]})")
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
for op in ("aten::mul", "aten::sub"):
    print(f"{op} by input shapes (self CPU ms, calls):")
    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == op]
    for e in sorted(rows, key=lambda e: -e.self_cpu_time_total)[:6]:
        print(f"  {e.self_cpu_time_total / 1e3:8.1f} ms  {e.count:4d}  {e.input_shapes}")
