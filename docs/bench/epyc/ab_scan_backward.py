"""In-process A/B of the training-side changes of 2026-12-05 (the chunked scan's delayed readout, triangular
inverse gradient and layouts; the conv's hand-written gradient) against the code before them (git revision
BEFORE, loaded from the repository's history), and of both against transformers' Mamba2 mixer. Issue #5's
shapes: hidden 512, 16 heads x 64, state 128, chunk 64, T = 2048, batch 1, fp32, fwd+bwd; variants alternating,
medians of `ROUNDS` rounds after two warm-ups.
Usage (in a clone of the repository): GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ab_scan_backward.py [--compile]
(--compile: the SSD and control + tau = 2 layers under torch.compile, the scan alone not timed)"""
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mixcon.benchmarks.speed import VARIANTS, layer_config, mamba2_mixer
from mixcon.layers.conba import Conba
from mixcon.ops.chunk import conba_scan

BEFORE = "a3a5bec"  # main before these changes
ROUNDS = 12


def module_at(revision: str, path: str, name: str):
    """A module file as it was at `revision`, imported under `name`."""
    source = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


old_scan = module_at(BEFORE, "mixcon/ops/chunk.py", "chunk_before").conba_scan
old_conv = module_at(BEFORE, "mixcon/layers/conba.py", "conba_before").Conba._conv


def median_ms(cases: dict) -> dict:
    times = {name: [] for name in cases}
    for f in cases.values():
        f(), f()
    for r in range(ROUNDS):
        for name in (list(cases) if r % 2 else list(cases)[::-1]):
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def scan_cases(delta_rule: bool, tau: int) -> dict:
    """The scan alone, fwd+bwd, on random inputs of the layer's shapes (keys and queries L2-normalised)."""
    g = torch.Generator().manual_seed(0)
    B, T, H, P, G, N = 1, 2048, 16, 64, 1, 128
    x = torch.randn(B, T, H, P, generator=g).requires_grad_()
    k = F.normalize(torch.randn(B, T, G, N, generator=g), dim=-1).requires_grad_()
    q = F.normalize(torch.randn(B, T, G, N, generator=g), dim=-1).requires_grad_()
    ld = (-0.1 * torch.rand(B, T, H, generator=g)).requires_grad_()
    beta = torch.rand(B, T, H, generator=g).requires_grad_()
    kw = dict(delta_rule=delta_rule, tau=tau, delay_gain=torch.randn(H, generator=g).requires_grad_() if tau else None)

    def run(fn):
        y, S = fn(x, k, q, ld, beta, **kw)
        (y.sum() + S.sum()).backward()
    return {"before": lambda: run(old_scan), "after": lambda: run(conba_scan)}


class Before(Conba):
    """The layer with the scan and conv of BEFORE."""

    scan_fn = staticmethod(old_scan)
    _conv = old_conv


def layer_cases(variant: str, compiled: bool) -> dict:
    """The layer, fwd+bwd: before (old scan and conv), after, and Mamba2's mixer; `compiled`: the layers under
    torch.compile (the first calls, outside the timing, compile)."""
    layers = {}
    for name, cls in (("before", Before), ("after", Conba)):
        torch.manual_seed(0)
        layers[name] = cls(layer_config(**VARIANTS[variant]), 0)
        if layers[name].delay_gain is not None:
            with torch.no_grad():
                layers[name].delay_gain.normal_()  # initialised 0; a trained layer's is not
        if compiled:
            layers[name] = torch.compile(layers[name])
    mamba2 = mamba2_mixer(layer_config(**VARIANTS["conba-ssd"]))
    u = torch.randn(1, 2048, 512).requires_grad_()
    return {"mamba2": lambda: mamba2(u).sum().backward(),
            "before": lambda: layers["before"](u).sum().backward(),
            "after": lambda: layers["after"](u).sum().backward()}


compiled = "--compile" in sys.argv
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, before = {BEFORE}, compiled = {compiled}\n",
      flush=True)
if not compiled:
    print("| case | before | after | after / before |")
    print("| --- | ---: | ---: | ---: |")
    for delta_rule, tau in ((False, 0), (False, 2), (True, 0), (True, 2)):
        ms = median_ms(scan_cases(delta_rule, tau))
        name = f"scan, {'delta rule' if delta_rule else 'SSD'}, tau = {tau}"
        print(f"| {name} | {ms['before']:.1f} ms | {ms['after']:.1f} ms | {ms['after'] / ms['before']:.2f} |",
              flush=True)
    print()
print("| layer | Mamba2 | before | after | before x Mamba2 | after x Mamba2 |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for variant in ("conba-ssd", "conba-control-tau2") if compiled else (
        "conba-ssd", "conba-ssd-tau2", "conba-control", "conba-control-tau2", "conba-full"):
    ms = median_ms(layer_cases(variant, compiled))
    print(f"| {variant} | {ms['mamba2']:.1f} ms | {ms['before']:.1f} ms | {ms['after']:.1f} ms | "
          f"{ms['mamba2'] / ms['before']:.2f}x | {ms['mamba2'] / ms['after']:.2f}x |", flush=True)
