"""Largest error of the Triton scan kernel (Triton's CPU interpreter) and of `conba_scan` against the fp64
sequential reference, where weak decays follow strong ones inside the kernel's block of 32 steps.

    python docs/bench/triton-hilo/weak_decays.py
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import torch

from mixcon.ops import conba_scan, conba_scan_reference
from mixcon.ops.triton_chunk import conba_scan_triton

g = torch.Generator().manual_seed(0)
B, T, H, P, N = 1, 64, 2, 8, 8
x, k, q = (torch.randn(B, T, *s, generator=g, dtype=torch.float64) for s in ((H, P), (1, N), (1, N)))
k, q = torch.nn.functional.normalize(k, dim=-1), torch.nn.functional.normalize(q, dim=-1)
beta, gain = torch.rand(B, T, H, generator=g, dtype=torch.float64), torch.randn(H, generator=g, dtype=torch.float64)
S0 = torch.randn(B, H, P, N, generator=g, dtype=torch.float64)
heads = [f"{name:>8}" for name in ("Triton y", "S_T", "past", "torch y", "S_T", "past")]
print(f"{'rule':>5} {'strong':>6} {'chunk':>5} | " + " ".join(heads[:3]) + " | " + " ".join(heads[3:]))
for delta_rule in (False, True):
    for strong in (-16.0, -150.0):
        ld = torch.full((B, T, H), -1e-3, dtype=torch.float64)
        ld[:, :20] = strong  # ends inside the kernel's first block of 32 steps
        kw = dict(delta_rule=delta_rule, tau=2, delay_gain=gain, initial_state=S0, return_past_states=True)
        refs = conba_scan_reference(x, k, q, ld, beta, **kw)
        f32 = {n: v.float() if isinstance(v, torch.Tensor) else v for n, v in kw.items()}
        for chunk in (64, 16):
            errs = []
            for fn in (conba_scan_triton, conba_scan):
                outs = fn(*(t.float() for t in (x, k, q, ld, beta)), chunk_size=chunk, **f32)
                errs += [(o.double() - r).abs().max().item() for o, r in zip(outs, refs, strict=True)]
            print(f"{'delta' if delta_rule else 'ssd':>5} {strong:>6.0f} {chunk:>5} | "
                  + " ".join(f"{e:8.1e}" for e in errs[:3]) + " | " + " ".join(f"{e:8.1e}" for e in errs[3:]))
