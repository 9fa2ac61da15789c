"""In-process A/B on an Intel CPU (docs/benchmarks.md §22): `small` (fp32) decoding steps with few-row products in
the two settings of `mixcon.ops.linear`: "slow BLAS" (the multiply-sum eager for one row and compiled up to 16
rows: what an AMD CPU gets, MKL being slow there) and "quick BLAS" (F.linear eager, the multiply-sum compiled for
one row only: what an Intel CPU gets since). Variants alternate; medians of the last 12 of 15 rounds of one step
at the same position (eager: batch 1 at 1K and 16K context; compiled: batches 1 and 4 at 1K).
Usage: python docs/bench/xeon/ab_blas_rows.py"""
import statistics
import time

import torch

import mixcon.ops.linear as ops_linear
from mixcon import MixConConfig, MixConForCausalLM

torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("small")).eval()
V = model.config.vocab_size
SETTINGS = {"slow BLAS": (True, 16), "quick BLAS": (False, 1)}


def use(name: str) -> None:
    ops_linear.SLOW_BLAS_ROWS, ops_linear.FEW_ROWS = SETTINGS[name]


def median_ms(B: int, context: int, rounds: int = 15) -> dict[str, float]:
    ids = torch.randint(0, V, (B, context))
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with torch.no_grad():
        cache = model.new_cache(B, max_length=context + 8)
        model(ids, cache=cache, logits_to_keep=1)
        token = ids[:, -1:].contiguous()
        for r in range(rounds):
            for name in (list(SETTINGS) if r % 2 else list(SETTINGS)[::-1]):
                use(name)
                start = time.perf_counter()
                model(token, cache=cache)
                times[name].append(time.perf_counter() - start)
                cache.seqlen -= 1  # decode the same position again
                cache.positions -= 1
                for layer in cache.layers:
                    if hasattr(layer, "ptr"):
                        layer.ptr = (layer.ptr - 1) % len(layer.slots)
    return {name: statistics.median(t[3:]) * 1e3 for name, t in times.items()}


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, this CPU's own setting: "
      f"{'slow' if ops_linear.slow_blas_rows() else 'quick'} BLAS")
print("mode      B  context  slow-BLAS ms  quick-BLAS ms  ratio")
for mode, B, context in [("eager", 1, 1024), ("eager", 1, 16384), ("compiled", 1, 1024), ("compiled", 4, 1024)]:
    if mode == "compiled":
        model.compile_decode()
    r = median_ms(B, context)
    print(f"{mode:<9} {B:<2} {context:<8} {r['slow BLAS']:12.2f} {r['quick BLAS']:13.2f}  "
          f"{r['slow BLAS'] / r['quick BLAS']:.2f}x")
use("quick BLAS" if not ops_linear.slow_blas_rows() else "slow BLAS")
