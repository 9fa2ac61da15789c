"""The Conba scan over fixed-length segments, chained through the state (DESIGN.md §2.1).

The contract makes a scan over T steps equal to scans over consecutive segments, each starting from
the final state and past states of the one before. With a fixed segment length, a scan compiled for
static shapes (`torch.compile(conba_scan, dynamic=False)`) sees one shape for every prompt length:
`MixConForCausalLM.compile_prefill` runs each full segment through it and the rest through the eager
chunked scan.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mixcon.ops._validate import check_scan_inputs
from mixcon.ops.chunk import conba_scan, initial_states
from mixcon.ops.dtypes import compute_dtype

ScanFn = Callable[..., tuple[torch.Tensor, ...]]


def segmented_scan(full: ScanFn, segment: int, rest: ScanFn = conba_scan) -> ScanFn:
    """A scan with the contract's signature that runs `full` on each whole `segment` steps and `rest` on
    the remainder (and on sequences shorter than a segment)."""
    if segment < 1:
        raise ValueError(f"segmented_scan: segment={segment} must be >= 1")

    def scan(
        x: torch.Tensor,  # (B, T, H, P)
        k: torch.Tensor,  # (B, T, G, N)
        q: torch.Tensor,  # (B, T, G, N)
        log_decay: torch.Tensor,  # (B, T, H)
        beta: torch.Tensor,  # (B, T, H)
        *,
        delta_rule: bool,
        tau: int = 0,
        delay_gain: torch.Tensor | None = None,
        initial_state: torch.Tensor | None = None,
        initial_past_states: torch.Tensor | None = None,
        chunk_size: int = 64,
        return_past_states: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        kw = dict(delta_rule=delta_rule, tau=tau, delay_gain=delay_gain, chunk_size=chunk_size)
        _, T, _, _, _, N = check_scan_inputs(x, k, q, log_decay, beta, tau, delay_gain, initial_state,
                                             initial_past_states)
        if T < segment:
            return rest(x, k, q, log_decay, beta, initial_state=initial_state,
                        initial_past_states=initial_past_states, return_past_states=return_past_states, **kw)
        state, past = initial_states(x, N, tau, initial_state, initial_past_states, compute_dtype(x))
        ys = []
        for start in range(0, T, segment):
            end = min(start + segment, T)
            # Dense copies: a compiled scan guards on strides, which differ for slices of different lengths.
            pieces = [t[:, start:end].clone(memory_format=torch.contiguous_format) for t in (x, k, q, log_decay, beta)]
            y, state, past = (full if end - start == segment else rest)(
                *pieces, initial_state=state, initial_past_states=past.contiguous(), return_past_states=True, **kw)
            ys.append(y)
        y = torch.cat(ys, dim=1)  # (B, T, H, P)
        return (y, state, past) if return_past_states else (y, state)

    return scan
