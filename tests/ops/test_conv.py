"""causal_conv equals torch's grouped conv1d, forward and hand-written gradients (fp64), alone and with packed
documents."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixcon.ops import causal_conv


def conv1d_reference(full: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """torch's depthwise conv1d over (B, width - 1 + T, C) -> (B, T, C), without padding."""
    weight = taps.t().unsqueeze(1)  # (C, 1, width): tap j reads full[:, t + j] (conv1d correlates)
    return F.conv1d(full.transpose(1, 2), weight, bias, groups=full.shape[-1]).transpose(1, 2)


def inputs(B: int = 2, T: int = 11, C: int = 5, width: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    full = torch.randn(B, width - 1 + T, C, dtype=torch.float64, generator=g).requires_grad_()
    taps = torch.randn(width, C, dtype=torch.float64, generator=g).requires_grad_()
    bias = torch.randn(C, dtype=torch.float64, generator=g).requires_grad_()
    return full, taps, bias


@pytest.mark.parametrize("T", [11, 1])  # 1: a decoding step's single product and sum
@pytest.mark.parametrize("width", [1, 2, 4])
def test_equals_conv1d_forward_and_gradients_fp64(width, T):
    full, taps, bias = inputs(T=T, width=width)
    out_grad = torch.randn(2, T, 5, dtype=torch.float64)
    got = causal_conv(full, taps, bias)
    ref = conv1d_reference(full, taps, bias)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (full, taps, bias), out_grad),
                    torch.autograd.grad(ref, (full, taps, bias), out_grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # without autograd, the same sum outside the autograd.Function
        torch.testing.assert_close(causal_conv(full, taps, bias), ref, rtol=1e-12, atol=1e-12)


def test_without_bias_equals_conv1d_forward_and_gradients_fp64():
    full, taps, _ = inputs()
    got, ref = causal_conv(full, taps, None), conv1d_reference(full, taps, None)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    out_grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (full, taps), out_grad), torch.autograd.grad(ref, (full, taps), out_grad),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    plain = full.detach()  # grad mode on, nothing that autograd records: the plain sum
    torch.testing.assert_close(causal_conv(plain, taps.detach(), None), ref.detach(), rtol=1e-12, atol=1e-12)


def test_packed_documents_equal_each_document_alone_fp64():
    """With seq_idx, each document is convolved as if the steps before it were zeros (the first document keeps
    the steps before the sequence); gradients included."""
    full, taps, bias = inputs(B=1, T=11)
    seq_idx = torch.tensor([[3, 3, 3, 3, 5, 5, 6, 6, 6, 6, 6]])
    out_grad = torch.randn(1, 11, 5, dtype=torch.float64)
    got = causal_conv(full, taps, bias, seq_idx)
    pieces, start = [], 0
    for n in (4, 2, 5):
        head = full[:, :3 + n] if start == 0 else F.pad(full[:, 3 + start:3 + start + n], (0, 0, 3, 0))
        pieces.append(conv1d_reference(head, taps, bias))
        start += n
    ref = torch.cat(pieces, dim=1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (full, taps, bias), out_grad),
                    torch.autograd.grad(ref, (full, taps, bias), out_grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradients_pass_gradcheck_and_reach_only_inputs_that_ask():
    full, taps, bias = inputs(B=1, T=6, C=3)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2]])
    assert torch.autograd.gradcheck(lambda f, t, b: causal_conv(f, t, b, seq_idx), (full, taps, bias))
    (g,) = torch.autograd.grad(causal_conv(full, taps.detach(), bias.detach()).sum(), full)
    assert g.shape == full.shape
    # a frozen input (its projection frozen, as in a probe of the conv alone): the taps' and bias' gradients only
    w = torch.randn(1, 6, 3, dtype=torch.float64)
    got = torch.autograd.grad((causal_conv(full.detach(), taps, bias) * w).sum(), (taps, bias))
    want = torch.autograd.grad((conv1d_reference(full.detach(), taps, bias) * w).sum(), (taps, bias))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_func_transforms_match_conv1d_fp64():
    full, taps, bias = (t.detach() for t in inputs(B=1, T=6, C=3))
    dirs = tuple(torch.randn_like(t) for t in (full, taps, bias))
    with torch.enable_grad():  # inputs that ask for gradients, as in training
        full.requires_grad_(), taps.requires_grad_(), bias.requires_grad_()
        got = torch.func.jvp(causal_conv, (full, taps, bias), dirs)[1]
        got_jac = torch.func.jacrev(causal_conv, argnums=(0, 1, 2))(full, taps, bias)
        got_vmap = torch.func.vmap(lambda t: causal_conv(full, t, bias))(torch.stack([taps, 2 * taps]))
    torch.testing.assert_close(got, torch.func.jvp(conv1d_reference, (full, taps, bias), dirs)[1])
    for a, b in zip(got_jac, torch.func.jacrev(conv1d_reference, argnums=(0, 1, 2))(full, taps, bias), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got_vmap, torch.stack([conv1d_reference(full, t, bias) for t in (taps, 2 * taps)]))


def test_forward_ad_through_the_autograd_function_sums_every_tangent():
    """Dual tensors whose primals also ask for gradients go through the Function's own jvp: the tangents of the
    input, the taps and the bias each add their term, with document boundaries as in the forward."""
    import torch.autograd.forward_ad as fwAD

    full, taps, bias = (t.detach() for t in inputs(B=1, T=6, C=3))
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2]])
    dirs = [torch.randn_like(t) for t in (full, taps, bias)]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t.clone().requires_grad_(), d) for t, d in zip((full, taps, bias), dirs, strict=True)]
        assert all(d.requires_grad for d in duals)
        got = fwAD.unpack_dual(causal_conv(*duals, seq_idx)).tangent
    want = torch.func.jvp(lambda f, t, b: causal_conv(f, t, b, seq_idx), (full, taps, bias), tuple(dirs))[1]
    torch.testing.assert_close(got, want)


def test_dynamo_traces_the_conv_with_gradients_in_one_graph():
    full, taps, bias = (t.float() for t in inputs())
    explained = torch._dynamo.explain(lambda f, t, b: causal_conv(f, t, b).sum())(full, taps, bias)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_bad_arguments_are_refused_by_name():
    """Taps of the transposed (C, width) layout, a bias or seq_idx of the wrong shape and a float seq_idx are refused
    with the argument's name (they failed in a broadcast, or a float seq_idx was taken)."""
    full, taps, bias = (t.detach() for t in inputs(B=2, T=11, C=5, width=4))
    seq_idx = torch.zeros(2, 11, dtype=torch.long)
    for args, match in [
        ((full[0], taps, bias), r"full must be \(B, width - 1 \+ T, C\), got shape \(14, 5\)"),
        ((full, taps.t(), bias), r"taps must be \(width, C\) with C=5 and 1 <= width <= 15 .*got shape \(5, 4\)"),
        ((full, torch.zeros(16, 5, dtype=full.dtype), bias), r"1 <= width <= 15"),
        ((full, taps, bias[:4]), r"bias must be \(C,\)=\(5,\) or None, got shape \(4,\)"),
        ((full, taps, bias, seq_idx[:, :10]), r"causal_conv: seq_idx must be \(B, T\)=\(2, 11\), got \(2, 10\)"),
        ((full, taps, bias, seq_idx.double()), r"causal_conv: seq_idx must hold integer document indices"),
    ]:
        with pytest.raises(ValueError, match=match):
            causal_conv(*args)


def test_no_steps_give_an_empty_output():
    """full holding only the width - 1 steps before the first (T = 0) is accepted, with or without bias and seq_idx."""
    full, taps, bias = torch.randn(2, 3, 5), torch.randn(4, 5), torch.randn(5)
    for args in [(full, taps, None), (full, taps, bias), (full, taps, bias, torch.zeros(2, 0, dtype=torch.long))]:
        assert causal_conv(*args).shape == (2, 0, 5)
