"""In-process A/B (docs/benchmarks.md §27): the host time of one decoding call `model(token, cache=cache)` of `small`
around a step replayed from a CUDA graph, the step's result stored instead of replayed (what remains is the Python
and dispatch work each token costs besides the graph), at an earlier commit ("before": its DecodeGraphs,
AttentionCache.tensors and MixConForCausalLM._hooked, read from git) vs the working tree ("after"). Variants
alternate; medians of rounds of 500 calls.
Usage (in a git checkout):
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/xeon/ab_host_decode.py --before 188cd53"""
import argparse
import statistics
import time

import torch
from old_code import old_module

import mixcon.generation.cache as cache_module
import mixcon.generation.cuda_graphs as graphs_module
import mixcon.models.mixcon as model_module
from mixcon import MixConConfig, MixConForCausalLM

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--before", required=True, help="the commit whose code is 'before'")
parser.add_argument("--rounds", type=int, default=9)
args = parser.parse_args()


def stored(graphs: type) -> type:
    """`graphs` on a CPU, a replay returning the step's result of the capture's warm-up (no work on the device)."""

    class Stored(graphs):
        def applies(self, input_ids):
            return True

        def _warm_up(self, run, device):
            self.last = run()
            return self.last

        def _capture(self, run, device):
            out = self.last
            return lambda: out

    return Stored


old_graphs = old_module(args.before, "mixcon/generation/cuda_graphs.py")
old_cache = old_module(args.before, "mixcon/generation/cache.py")
VARIANTS = {
    "before": (stored(old_graphs.DecodeGraphs), old_cache.AttentionCache.tensors,
               old_module(args.before, "mixcon/models/mixcon.py").MixConForCausalLM._hooked),
    "after": (stored(graphs_module.DecodeGraphs), cache_module.AttentionCache.tensors,
              model_module.MixConForCausalLM._hooked),
}
torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("small")).eval()
model.capture_decode()
token = torch.tensor([[5]])


def host_time(name: str) -> float:
    graphs, tensors, hooked = VARIANTS[name]
    cache_module.AttentionCache.tensors, model_module.MixConForCausalLM._hooked = tensors, hooked
    model._decode_graphs = graphs()
    with torch.no_grad():
        cache = model.new_cache(1, 600)
        model(torch.randint(0, model.config.vocab_size, (1, 16)), cache=cache)
        for _ in range(4):  # both ring phases captured
            model(token, cache=cache)
        start = time.perf_counter()
        for _ in range(500):
            model(token, cache=cache)
    return (time.perf_counter() - start) / 500


times: dict[str, list[float]] = {name: [] for name in VARIANTS}
for _ in range(args.rounds):
    for name in VARIANTS:
        times[name].append(host_time(name))
before, after = (statistics.median(times[n]) * 1e6 for n in VARIANTS)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of 500 calls")
print(f"host time per decoding call: before {before:.1f} us, after {after:.1f} us ({before / after:.2f}x)")
