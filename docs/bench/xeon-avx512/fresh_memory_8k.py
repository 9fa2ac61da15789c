"""One Conba layer's fwd+bwd at T = 8192, B = 1 (bench speed's shapes), called four times per variant: wall time,
huge-page faults (thp_fault_alloc, 2 MiB each) and all page faults (pgfault) of each call, from /proc/vmstat, and
the CPU time the hypervisor took from this VM meanwhile (steal, /proc/stat) (docs/benchmarks.md §38)."""

import os
import time
from pathlib import Path

import torch

from mixcon.benchmarks import speed
from mixcon.layers.conba import Conba


def vmstat() -> tuple[int, int, int, float]:
    fields = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    steal = int(Path("/proc/stat").read_text().split()[8]) / os.sysconf("SC_CLK_TCK")  # seconds, all CPUs
    return int(fields["thp_fault_alloc"]), int(fields["thp_fault_fallback"]), int(fields["pgfault"]), steal


torch.manual_seed(0)
for name in ("conba-ssd", "conba-control-tau2"):
    config = speed.layer_config().replace(**speed.VARIANTS[name])
    step = speed.layer_step(Conba(config, 0), torch.randn(1, 8192, 512), True)
    for _ in range(4):
        before = vmstat()
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
        after = vmstat()
        print(f"{name:20s} {seconds * 1e3:6.0f} ms  huge-page faults {after[0] - before[0]:5d}  "
              f"fallbacks {after[1] - before[1]}  page faults {after[2] - before[2]:6d}  "
              f"steal {(after[3] - before[3]) * 1e3:5.0f} ms", flush=True)
