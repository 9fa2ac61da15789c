"""A `small` Conba layer's fwd+bwd at 8 x 512 (fp32) with the chunked scan of c57f5a8 (y returned as a permuted view)
and of this checkout (y contiguous), taking turns in one process: the median of 9 (docs/benchmarks.md §31).
Usage: git show c57f5a8:mixcon/ops/chunk.py > /tmp/chunk_old.py &&
       GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/xeon/ab_scan_contiguous.py /tmp"""
import statistics
import sys
import time

import torch

from mixcon import MixConConfig
from mixcon.layers.conba import Conba
from mixcon.ops import conba_scan

sys.path.insert(0, sys.argv[1])
import chunk_old

torch.manual_seed(0)
config = MixConConfig.preset("small")
layer = Conba(config, 0).train()
u = torch.randn(8, 512, config.d_model, requires_grad=True)
forms = {"c57f5a8 (y a view)": chunk_old.conba_scan, "this checkout (y contiguous)": conba_scan}
times: dict[str, list[float]] = {name: [] for name in forms}


def step(scan) -> float:
    layer.scan_fn = staticmethod(scan)
    start = time.perf_counter()
    layer(u).square().mean().backward()
    return time.perf_counter() - start


for scan in forms.values():
    step(scan), step(scan)  # warm-up
for r in range(9):
    for name in list(forms)[:: 1 if r % 2 == 0 else -1]:
        times[name].append(step(forms[name]))
for name, values in times.items():
    print(f"{name:30s} median {statistics.median(values) * 1e3:.1f} ms  {[round(v * 1e3) for v in values]}")
