"""rms_norm: its CPU autograd.Function equals F.rms_norm (forward, gradients, forward-mode AD, torch.func), and the
cases it leaves to F.rms_norm take it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixcon.ops.norm as norm_ops
from mixcon.ops import rms_norm


def inputs(dtype: torch.dtype = torch.float64, shape: tuple[int, ...] = (2, 5, 16), scale: float = 1.0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (scale * torch.randn(*shape, dtype=torch.float64, generator=g)).to(dtype).requires_grad_()
    w = torch.empty(shape[-1], dtype=torch.float64).uniform_(0.5, 1.5, generator=g).to(dtype).requires_grad_()
    return x, w


def reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, eps)


@pytest.mark.parametrize("eps,scale", [(1e-5, 1.0), (1e-2, 0.01)])  # 0.01: eps changes the result
@pytest.mark.parametrize("shape", [(2, 5, 16), (7, 16), (0, 16)])
def test_cpu_function_equals_f_rms_norm_forward_and_gradients_fp64(shape, eps, scale):
    x, w = inputs(shape=shape, scale=scale)
    got, want = rms_norm(x, w, eps), reference(x, w, eps)
    assert got.grad_fn is not None and "_RMSNorm" in type(got.grad_fn).__name__  # the Function, not F.rms_norm
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    out_grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, w), out_grad), torch.autograd.grad(want, (x, w), out_grad),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if x.numel():
        assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, eps), (x, w))
        assert torch.autograd.gradgradcheck(lambda a, b: rms_norm(a, b, eps), (x, w))


def test_fp32_matches_fp64_and_gradients_reach_only_inputs_that_ask():
    x64, w64 = inputs()
    x, w = (t.detach().float().requires_grad_() for t in (x64, w64))
    torch.testing.assert_close(rms_norm(x, w, 1e-5).double(), reference(x64, w64, 1e-5), rtol=1e-6, atol=1e-6)
    (gw,) = torch.autograd.grad(rms_norm(x.detach(), w, 1e-5).sum(), w)  # a frozen input: the weight's alone
    torch.testing.assert_close(gw.double(), torch.autograd.grad(reference(x64.detach(), w64, 1e-5).sum(), w64)[0],
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert rms_norm(x, w, 1e-5).grad_fn is None


def test_forward_ad_and_torch_func_transforms_fp64():
    import torch.autograd.forward_ad as fwAD

    x, w = (t.detach() for t in inputs())
    dirs = (torch.randn_like(x), torch.randn_like(w))
    want = torch.func.jvp(lambda a, b: reference(a, b, 1e-5), (x, w), dirs)[1]
    with torch.enable_grad():  # inputs that ask for gradients, as in training: through the Function
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.testing.assert_close(torch.func.jvp(lambda a, b: rms_norm(a, b, 1e-5), (xg, wg), dirs)[1], want)
        for dx, dw in ((dirs[0], None), (None, dirs[1]), dirs):  # each tangent alone, then both
            expect = torch.func.jvp(lambda a, b: reference(a, b, 1e-5), (x, w),
                                    (torch.zeros_like(x) if dx is None else dx,
                                     torch.zeros_like(w) if dw is None else dw))[1]
            with fwAD.dual_level():
                duals = [t if d is None else fwAD.make_dual(t, d) for t, d in ((xg, dx), (wg, dw))]
                got = fwAD.unpack_dual(rms_norm(*duals, 1e-5)).tangent
            torch.testing.assert_close(got, expect)
        jac = torch.func.jacrev(lambda a, b: rms_norm(a, b, 1e-5), argnums=(0, 1))(xg, wg)
        batched = torch.func.vmap(lambda b: rms_norm(xg, b, 1e-5))(torch.stack([wg, 2 * wg]))
    for a, b in zip(jac, torch.func.jacrev(lambda a, b: reference(a, b, 1e-5), argnums=(0, 1))(x, w), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(batched, torch.stack([reference(x, b, 1e-5) for b in (w, 2 * w)]))


def test_other_cases_take_f_rms_norm(monkeypatch):
    """bf16 inputs, CPU autocast, a weight of another dtype, compiled graphs and forwards without autograd (decoding
    steps, where an autograd.Function call is overhead) take F.rms_norm (its fused kernels and autocast rule); fp32
    and fp64 in eager mode on a CPU with gradients the Function."""
    calls, plain = [], F.rms_norm
    monkeypatch.setattr(norm_ops.F, "rms_norm", lambda *a, **k: calls.append(a[0].dtype) or plain(*a, **k))
    x, w = inputs(torch.float32)
    rms_norm(x, w, 1e-5)
    rms_norm(x.detach(), w, 1e-5)  # the weight alone asks
    assert not calls
    rms_norm(x.detach().bfloat16(), w.detach().bfloat16(), 1e-5)
    rms_norm(x, w.detach().double(), 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rms_norm(x, w, 1e-5)
    with torch.no_grad():
        rms_norm(x, w, 1e-5)
    rms_norm(x.detach(), w.detach(), 1e-5)
    assert calls == [torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.float32]
    monkeypatch.setattr(norm_ops.torch.compiler, "is_compiling", lambda: True)
    rms_norm(x, w, 1e-5)
    assert len(calls) == 6
