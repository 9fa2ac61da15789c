"""Conba layer variants vs transformers' Mamba2 mixer, fwd+bwd at T = 2048, B = 1, the modules built as
`mixcon bench speed` builds them (docs/benchmarks.md §34); four rounds of three repeats each, flush-denormal off
and on in turn: is the benchmark's slow control + tau = 2 row the layer or the run?
Usage: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/epyc/ab_control_tau2.py"""
import statistics
import time

import torch

from mixcon.benchmarks.speed import SSD, VARIANTS, layer_config, mamba2_mixer
from mixcon.layers.conba import Conba

torch.manual_seed(0)
base = layer_config()
modules = {"mamba2": mamba2_mixer(base.replace(**SSD))}
modules.update({name: Conba(base.replace(**over), 0) for name, over in VARIANTS.items()})
u = torch.randn(1, 2048, base.d_model)


def fwd_bwd(module: torch.nn.Module) -> None:
    out = module(u.clone().requires_grad_())
    (out[0] if isinstance(out, tuple) else out).sum().backward()


for flush in (False, True, False, True):
    torch.set_flush_denormal(flush)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for module in modules.values():  # warm-up
        fwd_bwd(module)
    for _ in range(3):
        for name, module in modules.items():  # the modules take turns
            start = time.perf_counter()
            fwd_bwd(module)
            times[name].append(time.perf_counter() - start)
    mamba = statistics.median(times["mamba2"])
    print(f"flush_denormal={flush}:", ", ".join(f"{name} {1e3 * statistics.median(t):.0f} ms "
                                                f"({mamba / statistics.median(t):.2f}x)" for name, t in times.items()),
          flush=True)
