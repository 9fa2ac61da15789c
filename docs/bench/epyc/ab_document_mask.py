"""In-process A/B of packed-document masks (seq_idx) in a `small` training step (fwd+bwd, fused head, eager
fp32): no seq_idx, one document per row (a seq_idx that never changes: the plain path), 2 and 8 documents
per row at random cuts; then one Conba and one attention layer alone, without and with 8 documents.
Variants alternate; medians of 7 rounds. Usage: python ab_document_mask.py B T"""
import statistics
import sys
import time

import torch

from mixcon import MixConConfig, MixConForCausalLM
from mixcon.layers.context import ForwardContext

torch.manual_seed(0)
B, T = (int(v) for v in sys.argv[1:3])
model = MixConForCausalLM(MixConConfig.preset("small"))
V = model.config.vocab_size
ids = torch.randint(0, V, (B, T))
labels = torch.randint(0, V, (B, T))


def documents(n: int) -> torch.Tensor:
    """(B, T) seq_idx of n documents per row, cut at random places."""
    cuts = torch.sort(torch.randint(1, T, (B, n - 1)), dim=1).values
    return (torch.arange(T)[None, None] >= cuts[..., None]).sum(1)


def median_ms(fns: dict, rounds: int = 7) -> dict:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def step(seq_idx: torch.Tensor | None) -> None:
    model(ids, labels=labels, return_logits=False, seq_idx=seq_idx).loss.backward()
    model.zero_grad(set_to_none=True)


variants = {"none": None, "one doc": torch.zeros(B, T, dtype=torch.long), "2 docs": documents(2),
            "8 docs": documents(8)}
ms = median_ms({k: (lambda v=v: step(v)) for k, v in variants.items()})
print(f"small train step, B={B}, T={T}")
for k, m in ms.items():
    print(f"  {k:8s} {m:8.0f} ms  {B * T / m * 1e3:6.0f} tok/s  x{m / ms['none']:.3f}")

h = torch.randn(B, T, model.config.d_model, requires_grad=True)
eight = documents(8)
for name in ("Conba", "Attention"):
    layer = next(layer.mixer for layer in model.layers if type(layer.mixer).__name__ == name)

    def run(seq_idx: torch.Tensor | None, layer=layer) -> None:
        layer(h, ForwardContext.build(None, B, T, None, h.device, seq_idx)).sum().backward()

    ms = median_ms({"plain": lambda: run(None), "8 docs": lambda: run(eight)})
    print(f"  one {name} layer fwd+bwd: {ms['plain']:.1f} ms plain, {ms['8 docs']:.1f} ms with 8 documents "
          f"(x{ms['8 docs'] / ms['plain']:.3f})")
