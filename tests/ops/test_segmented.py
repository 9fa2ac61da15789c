"""`segmented_scan`: a scan over fixed-length segments chained through the state equals one scan."""

from __future__ import annotations

import pytest
import torch
from test_conba_scan import make_inputs

from mixcon.ops import conba_scan, conba_scan_reference, segmented_scan


@pytest.mark.parametrize("delta_rule", [False, True], ids=["ssd", "delta"])
@pytest.mark.parametrize("T,segment,tau,init", [
    (37, 8, 2, True),  # full segments and a remainder
    (32, 8, 0, False),  # whole segments only
    (30, 4, 5, True),  # tau longer than a segment
    (6, 8, 2, True),  # shorter than one segment
])
def test_segments_equal_one_scan(delta_rule, T, segment, tau, init):
    x, k, q, ld, beta, gain, S0 = make_inputs(T=T)
    past0 = torch.randn(x.shape[0], tau, *S0.shape[1:], dtype=S0.dtype) if init else None
    kw = dict(delta_rule=delta_rule, tau=tau, delay_gain=gain if tau else None, initial_state=S0 if init else None,
              initial_past_states=past0, return_past_states=True)
    lengths: dict[str, list[int]] = {"full": [], "rest": []}

    def spy(name, fn):
        return lambda *a, **k_: lengths[name].append(a[0].shape[1]) or fn(*a, **k_)

    # Segments through the chunked scan, the rest through the reference loop, against one reference scan.
    scan = segmented_scan(spy("full", conba_scan), segment, rest=spy("rest", conba_scan_reference))
    y, state, past = scan(x, k, q, ld, beta, chunk_size=4, **kw)
    y_ref, state_ref, past_ref = conba_scan_reference(x, k, q, ld, beta, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state, state_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(past, past_ref, rtol=1e-9, atol=1e-9)
    assert lengths["full"] == [segment] * (T // segment)
    assert lengths["rest"] == ([T % segment] if T % segment else [])
    assert len(scan(x, k, q, ld, beta, **{**kw, "return_past_states": False})) == 2


def test_segment_must_be_positive():
    with pytest.raises(ValueError, match="segment=0"):
        segmented_scan(conba_scan, 0)
