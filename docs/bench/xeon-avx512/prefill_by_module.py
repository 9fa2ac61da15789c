"""Where a compiled 1K prefill of `small` goes, by module (forward hooks with perf_counter; docs/benchmarks.md §37)."""

import collections
import statistics
import time

import torch

from mixcon.config import MixConConfig
from mixcon.models.mixcon import MixConForCausalLM

torch.manual_seed(0)
T = 1024
model = MixConForCausalLM(MixConConfig.preset("small")).eval()
model.compile_prefill()
ids = torch.randint(0, 8192, (1, T))


def prefill() -> None:
    with torch.no_grad():
        model(ids, cache=model.new_cache(1, T + 8), logits_to_keep=1)


for _ in range(2):
    prefill()
totals = []
for _ in range(5):
    start = time.perf_counter()
    prefill()
    totals.append(time.perf_counter() - start)
print(f"without hooks: {statistics.median(totals) * 1e3:.1f} ms per {T}-token prefill (median of 5)")

spent: dict[str, list[float]] = collections.defaultdict(list)


def timed(name: str, module: torch.nn.Module) -> None:
    module.register_forward_pre_hook(lambda m, args: setattr(m, "_start", time.perf_counter()))
    module.register_forward_hook(lambda m, args, out: spent[name].append(time.perf_counter() - m._start))


for layer in model.layers:
    timed(f"mixer {layer.mixer_kind}", layer.mixer)
    timed(f"ffn {layer.ffn_kind}", layer.ffn)
    timed("norms", layer.mixer_norm)
    timed("norms", layer.ffn_norm)
runs = []
for _ in range(5):
    spent.clear()
    prefill()
    runs.append({name: sum(times) for name, times in spent.items()})
for name in sorted(runs[0]):
    ms = statistics.median(run[name] for run in runs) * 1e3
    print(f"{name:16s} {len(spent[name]):3d} calls  {ms:7.1f} ms  ({ms / len(spent[name]):.2f} ms each)")
