"""`small` (MixCon) against its Transformer twin: decoding steps after a 16,384-token prompt (docs/benchmarks.md
§32), compiled unless `eager` is given, called on the model directly (no `generate`): six windows of 16 steps
per model, the models taking turns; the median window.
Usage: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/epyc/decode_twin_16k.py [context] [eager]"""
import statistics
import sys
import time

import torch

from mixcon import MixConConfig, MixConForCausalLM
from mixcon.benchmarks.common import twins

torch.manual_seed(0)
context = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 16384
eager = "eager" in sys.argv
configs = twins(MixConConfig.preset("small"))
ids = torch.randint(0, configs["mixcon"].vocab_size, (1, context))
models, caches = {}, {}
with torch.no_grad():
    for name in ("mixcon", "transformer-twin"):
        model = MixConForCausalLM(configs[name]).eval()
        if not eager:
            model.compile_decode()
        cache = model.new_cache(1, max_length=context + 400)
        start = time.perf_counter()
        model(ids, cache=cache, logits_to_keep=1)
        print(f"{name}: prefill {time.perf_counter() - start:.1f} s", flush=True)
        models[name], caches[name] = model, cache
    token = ids[:, -1:].contiguous()
    for name, model in models.items():  # warm-up (and the compile)
        for _ in range(3):
            model(token, cache=caches[name])
    windows: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(6):
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(16):
                model(token, cache=caches[name])
            windows[name].append((time.perf_counter() - start) / 16 * 1e3)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, context {context}, "
      f"{'eager' if eager else 'compile_decode'}")
for name, ms in windows.items():
    print(f"{name}: median {statistics.median(ms):.2f} ms per step; windows " + " ".join(f"{x:.2f}" for x in ms))
ratio = statistics.median(windows["transformer-twin"]) / statistics.median(windows["mixcon"])
print(f"MixCon {ratio:.2f}x faster than its Transformer twin")
