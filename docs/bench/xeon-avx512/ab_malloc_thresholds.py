"""glibc's allocator thresholds, A/B (docs/benchmarks.md §38): fwd+bwd at T = 8192, B = 1 of the Conba SSD and
control + τ = 2 layers and transformers' Mamba2 mixer (bench speed's shapes), in child processes that alternate
between GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (the benchmarks' setting: freed blocks above glibc's mmap threshold,
at most 32 MiB, are unmapped, and the next call faults in fresh pages) and the same with mmap_threshold 256 MiB and
trim_threshold 4 GiB (freed blocks kept for reuse). Each child: one warm-up round, then 4 rounds calling each layer
once; per call, wall time and huge-page faults. Printed: medians over all children of a setting."""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"usual": "glibc.malloc.hugetlb=1",
            "raised": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=268435456"
                      ":glibc.malloc.trim_threshold=4294967296"}
CHILDREN = 3  # per setting


def child() -> None:
    import torch

    from mixcon.benchmarks import speed
    from mixcon.layers.conba import Conba

    def thp_faults() -> int:
        return int(dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())["thp_fault_alloc"])

    torch.manual_seed(0)
    layers = {name: Conba(speed.layer_config().replace(**speed.VARIANTS[name]), 0)
              for name in ("conba-ssd", "conba-control-tau2")}
    layers["transformers-mamba2"] = speed.mamba2_mixer(speed.layer_config())
    u = torch.randn(1, 8192, 512)
    steps = {name: speed.layer_step(layer, u, True) for name, layer in layers.items()}
    for r in range(5):
        for name, step in steps.items():
            before, t0 = thp_faults(), time.perf_counter()
            step()
            if r:
                print(name, time.perf_counter() - t0, thp_faults() - before, flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    child()
elif __name__ == "__main__":
    times: dict[tuple[str, str], list[float]] = {}
    faults: dict[tuple[str, str], list[int]] = {}
    for i in range(CHILDREN):
        for setting in (SETTINGS if i % 2 == 0 else list(SETTINGS)[::-1]):
            out = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, check=True,
                                 env={**os.environ, "GLIBC_TUNABLES": SETTINGS[setting]}).stdout
            for line in out.splitlines():
                name, seconds, n = line.split()
                times.setdefault((name, setting), []).append(float(seconds))
                faults.setdefault((name, setting), []).append(int(n))
    names = dict.fromkeys(name for name, _ in times)
    print(f"{'layer':22s} {'usual ms':>9s} {'raised ms':>9s} {'speed-up':>8s}  huge-page faults per call "
          "(usual / raised)")
    for name in names:
        usual, raised = (statistics.median(times[name, s]) for s in SETTINGS)
        print(f"{name:22s} {usual * 1e3:9.0f} {raised * 1e3:9.0f} {usual / raised:7.2f}x  "
              f"{statistics.median(faults[name, 'usual']):.0f} / {statistics.median(faults[name, 'raised']):.0f}")
