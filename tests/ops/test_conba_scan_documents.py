"""Packed documents (`seq_idx`) in the Conba scan: each document is scanned as if alone."""

from __future__ import annotations

import pytest
import torch

from mixcon.ops import conba_scan, conba_scan_reference
from tests.ops.test_conba_scan import make_inputs

# Document lengths per row; rows of one case sum to the same T.
LAYOUTS = {
    "one": [[23], [23]],
    "chunk-aligned": [[8, 8, 7], [16, 7]],
    "single-tokens": [[1, 1, 5, 1, 15], [3, 1, 1, 1, 17]],
    "starts-late": [[20, 3], [22, 1]],
}


def seq_idx_for(lengths: list[list[int]], offset: int = 3) -> torch.Tensor:
    """(B, T) document indices, starting from an arbitrary index per row."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)) + offset * b, torch.tensor(row))
                        for b, row in enumerate(lengths)])


def scan_alone(fn, inputs, lengths, S0, past0, **kw):
    """Each row's documents scanned one by one: the first from the initial states, the rest from zeros."""
    x, k, q, ld, beta = inputs
    ys, finals, pasts = [], [], []
    for b, row in enumerate(lengths):
        start, y_row = 0, []
        for i, n in enumerate(row):
            span = slice(start, start + n)
            first = i == 0
            y, s, past = fn(x[b:b + 1, span], k[b:b + 1, span], q[b:b + 1, span], ld[b:b + 1, span],
                            beta[b:b + 1, span], return_past_states=True,
                            initial_state=S0[b:b + 1] if first and S0 is not None else None,
                            initial_past_states=past0[b:b + 1] if first and past0 is not None else None, **kw)
            y_row.append(y)
            start += n
        ys.append(torch.cat(y_row, 1))
        finals.append(s)
        pasts.append(past)
    return torch.cat(ys), torch.cat(finals), torch.cat(pasts)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
@pytest.mark.parametrize("tau,init", [(0, False), (2, True), (5, False), (3, True)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_equals_each_document_alone_fp64(layout, tau, init, delta_rule):
    lengths = LAYOUTS[layout]
    T = sum(lengths[0])
    x, k, q, ld, beta, gain, S0 = make_inputs(T=T, G=2)
    S0 = S0 if init else None
    past0 = torch.randn(2, tau, 4, 5, 6, dtype=torch.float64) if init else None
    kw = dict(delta_rule=delta_rule, tau=tau, delay_gain=gain if tau else None)
    alone = scan_alone(conba_scan_reference, (x, k, q, ld, beta), lengths, S0, past0, **kw)
    seq_idx = seq_idx_for(lengths)
    packed = dict(initial_state=S0, initial_past_states=past0, seq_idx=seq_idx, return_past_states=True, **kw)
    ref = conba_scan_reference(x, k, q, ld, beta, **packed)
    for chunk in (4, 8, 64):
        got = conba_scan(x, k, q, ld, beta, chunk_size=chunk, **packed)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for a, b in zip(ref, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_one_document_index_everywhere_changes_nothing():
    x, k, q, ld, beta, gain, S0 = make_inputs(T=21, G=2)
    kw = dict(delta_rule=True, tau=2, delay_gain=gain, initial_state=S0, chunk_size=8)
    plain = conba_scan(x, k, q, ld, beta, **kw)
    same = conba_scan(x, k, q, ld, beta, seq_idx=torch.full((2, 21), 7), **kw)
    for a, b in zip(plain, same, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
def test_packed_gradients_match_reference_fp64(delta_rule):
    inputs = [t.requires_grad_() for t in make_inputs(T=19, G=2)]
    x, k, q, ld, beta, gain, S0 = inputs
    seq_idx = seq_idx_for([[5, 1, 13], [8, 8, 3]])
    kw = dict(delta_rule=delta_rule, tau=2, delay_gain=gain, initial_state=S0, seq_idx=seq_idx)
    w = torch.randn(2, 19, 4, 5, dtype=torch.float64)
    grads = []
    for fn, extra in ((conba_scan_reference, {}), (conba_scan, {"chunk_size": 8})):
        y, s = fn(x, k, q, ld, beta, **kw, **extra)
        grads.append(torch.autograd.grad((y * w).sum() + s.square().sum(), inputs))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("fn", [conba_scan, conba_scan_reference], ids=["chunked", "reference"])
def test_bad_seq_idx_raises_clear_errors(fn):
    x, k, q, ld, beta, _, _ = make_inputs(T=6, G=2)
    for bad, match in ((torch.zeros(2, 5, dtype=torch.long), r"seq_idx must be \(B, T\)=\(2, 6\)"),
                       (torch.zeros(2, 6), "integer document indices"),
                       (torch.tensor([[0, 0, 1, 1, 0, 0]] * 2), "non-decreasing")):
        with pytest.raises(ValueError, match=match):
            fn(x, k, q, ld, beta, delta_rule=True, seq_idx=bad)


def test_packed_scan_compiles_into_one_graph(have_c_compiler):
    if not have_c_compiler:
        pytest.skip("torch.compile needs a C compiler")
    x, k, q, ld, beta, gain, S0 = make_inputs(T=20, G=2, dtype=torch.float32)
    seq_idx = seq_idx_for([[5, 1, 14], [20]])
    kw = dict(delta_rule=True, tau=2, delay_gain=gain, initial_state=S0, seq_idx=seq_idx, chunk_size=8)
    compiled = torch.compile(conba_scan, fullgraph=True, dynamic=False)
    for a, b in zip(compiled(x, k, q, ld, beta, **kw), conba_scan(x, k, q, ld, beta, **kw), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
