"""Custom autograd Functions with forward-mode AD outside compiled graphs: dynamo does not trace a Function that
defines `jvp` (it breaks the graph there), so each such op has a plain Function and a subclass adding `jvp`."""

from __future__ import annotations

import torch


def traced(plain: type[torch.autograd.Function], with_jvp: type[torch.autograd.Function]
           ) -> type[torch.autograd.Function]:
    """`plain` inside a graph that dynamo traces, else `with_jvp` (torch.func.jvp and forward AD go through it)."""
    return plain if torch.compiler.is_compiling() else with_jvp
