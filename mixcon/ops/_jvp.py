"""Custom autograd Functions with forward-mode AD outside compiled graphs: dynamo does not trace a Function that
defines `jvp` (it breaks the graph there), so each such op has a plain Function and a subclass adding `jvp`."""

from __future__ import annotations

import torch


def traced(plain: type[torch.autograd.Function], with_jvp: type[torch.autograd.Function]
           ) -> type[torch.autograd.Function]:
    """`plain` inside a graph that dynamo traces, else `with_jvp` (torch.func.jvp and forward AD go through it)."""
    return plain if torch.compiler.is_compiling() else with_jvp


def save_for_both(ctx: torch.autograd.function.FunctionCtx, *tensors: torch.Tensor | None) -> None:
    """Keep `tensors` for a Function's backward and for its jvp."""
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)


def carries_tangents(*tensors: torch.Tensor | None) -> bool:
    """Whether any of `tensors` is a forward-mode AD dual (torch.autograd.forward_ad) or a torch.func transform's
    wrapper (jvp, vmap, grad): what a kernel outside autograd would silently drop."""
    from torch.autograd import forward_ad

    return any(t is not None and (torch._C._functorch.is_functorch_wrapped_tensor(t)
                                  or forward_ad.unpack_dual(t).tangent is not None) for t in tensors)
