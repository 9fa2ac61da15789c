"""Mixture-of-experts feed-forward (DESIGN.md §3): softmax router, top-K, SwiGLU experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixcon.checks import check_dtype
from mixcon.layers.linear import Linear
from mixcon.ops.dtypes import compute_dtype
from mixcon.ops.linear import batched_linear, linear


@dataclass
class RouterStats:
    """What one MoE call reports besides its output."""

    aux_loss: torch.Tensor  # n · Σ_i f_i P_i: 1 for a uniform router, n for a collapsed one
    z_loss: torch.Tensor  # mean logsumexp(router logits)^2
    counts: torch.Tensor  # (n,) tokens routed to each expert
    logits: torch.Tensor  # (M, n) router logits of the tokens routed (a call's real tokens, in order)


def static_shapes(h: torch.Tensor) -> bool:
    """Whether a decoding step's MoE on many tokens runs every expert on every token (no data-dependent shapes,
    no host sync): while compiling, and on accelerators. On a CPU in eager mode, grouping the tokens by expert
    costs K/n of its products (docs/benchmarks.md §16), the expert counts being on the host anyway."""
    return torch.compiler.is_compiling() or h.device.type != "cpu"


class MoE(nn.Module):
    """n SwiGLU experts; each token goes to its top-K experts, weights renormalised over the K."""

    def __init__(self, d_model: int, hidden: int, n_experts: int, top_k: int, init_std: float | None = 0.02) -> None:
        """`init_std`: the experts' weights are drawn from Normal(0, init_std); None leaves them for the model that
        holds the layer to draw (`MixConForCausalLM.reset_parameters`)."""
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"MoE: top_k={top_k} must be in [1, n_experts={n_experts}]")
        self.n_experts, self.top_k = n_experts, top_k
        self.router = Linear(d_model, n_experts, bias=False)
        # Experts stored as stacked nn.Linear weights (out, in): (n, 2·hidden, d) and (n, d, hidden). Weights
        # saved before this layout held (n, in, out): `models.files.upgrade_expert_layout` converts them.
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, 2 * hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        if init_std is not None:
            nn.init.normal_(self.w_gate_up, 0.0, init_std)
            nn.init.normal_(self.w_down, 0.0, init_std)

    def extra_repr(self) -> str:
        n, d, hidden = self.w_down.shape
        return f"d_model={d}, hidden={hidden}, n_experts={n}, top_k={self.top_k}"

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M, d) -> logits and probabilities (M, n), top-K weights (M, K) summing to 1, expert ids (M, K)."""
        logits = self.router(h).to(compute_dtype(h))
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return logits, probs, weights / weights.sum(-1, keepdim=True), experts

    @staticmethod
    def expert(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        """One expert's SwiGLU on (m, d) -> (m, d), its weights (2·hidden, d) and (d, hidden)."""
        gate, up = linear(h, w_gate_up).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, w_down)

    def combine(self, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_k weight_k · expert_k(h) for each token: (M, d), (M, K), (M, K) -> (M, d); `counts` (n,) pairs per
        expert, if already known."""
        # The M·K (token, expert) pairs grouped by expert, without a per-token loop: one sort, the tokens gathered
        # once in expert order and split per expert, the stacked weights unbound once, one scatter-add; so the
        # backward fills no (M, d) or all-experts-sized zero tensor per expert (an index of the tokens or of the
        # weights per expert would, each).
        flat_expert = experts.reshape(-1)  # (M·K,)
        order = flat_expert.argsort(stable=True)
        token_of = order // self.top_k  # token index of each sorted assignment
        if counts is None:
            counts = torch.bincount(flat_expert, minlength=self.n_experts)
        xs = h[token_of]  # (M·K, d), grouped by expert
        w_gate_up, w_down = self.w_gate_up.unbind(0), self.w_down.unbind(0)
        ys = [self.expert(x, w_gate_up[e], w_down[e]) for e, x in enumerate(xs.split(counts.tolist())) if len(x)]
        y = torch.cat(ys) if ys else xs  # (M·K, d)
        w = weights.reshape(-1)[order].to(y.dtype)  # (M·K,)
        return torch.zeros_like(h).index_add_(0, token_of, (y * w[:, None]).to(h.dtype))  # bf16 under autocast

    def combine_gathered(self, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """`combine` for a few tokens (M·K ≤ n): where `static_shapes`, each pair's expert weights gathered and two
        batched products; eager on a CPU, each pair's expert read in place (the host knows the ids)."""
        M, K = experts.shape
        if not static_shapes(h):  # each pair's expert read in place: a gather would copy its weights first
            ys = torch.cat([self.expert(h[i // K: i // K + 1], self.w_gate_up[e], self.w_down[e])
                            for i, e in enumerate(experts.reshape(-1).tolist())])  # (M·K, d)
        else:
            e = experts.reshape(-1)  # (M·K,)
            x = h[:, None, None].expand(M, K, 1, h.shape[-1]).reshape(M * K, 1, -1)  # (M·K, 1, d); no host sync
            gate, up = batched_linear(x, self.w_gate_up[e]).chunk(2, dim=-1)  # (M·K, 1, hidden)
            ys = batched_linear(F.silu(gate) * up, self.w_down[e])[:, 0]  # (M·K, d)
        return (weights.reshape(-1, 1).to(ys.dtype) * ys).view(M, K, -1).sum(1).to(h.dtype)

    def combine_dense(self, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """`combine` with every expert on every token, weighted by the sparse (M, n) routing matrix: each
        expert read once and no data-dependent shapes (a compiled decoding step)."""
        gate, up = torch.einsum("md,ned->nme", h, self.w_gate_up).chunk(2, dim=-1)  # (n, M, hidden)
        ys = (F.silu(gate) * up) @ self.w_down.transpose(1, 2)  # (n, M, d)
        routing = torch.zeros(h.shape[0], self.n_experts, dtype=ys.dtype, device=h.device)
        routing = routing.scatter(1, experts, weights.to(ys.dtype))  # (M, n)
        return torch.einsum("nmd,mn->md", ys, routing).to(h.dtype)

    def forward(self, h: torch.Tensor, stats: bool = True, token_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, RouterStats | None]:
        """(..., d) -> (..., d) and the router statistics. `token_mask` (...) True for real tokens: pads skip
        the experts (their output is 0) and count in no statistic. stats=False: the output alone (and None),
        for the decoding step: gathered experts for a few tokens; for more, all experts where `static_shapes`
        (no data-dependent shapes), else grouped by expert."""
        shape = h.shape
        if shape[-1] != self.router.in_features:
            raise ValueError(f"MoE: input must be (..., d_model={self.router.in_features}), got shape {tuple(shape)}")
        check_dtype("MoE", h, self.w_gate_up.dtype)
        if token_mask is not None and token_mask.shape != shape[:-1]:
            raise ValueError(f"MoE: token_mask must have the input's shape but its last dimension, "
                             f"{tuple(shape[:-1])}, got {tuple(token_mask.shape)}")
        h = h.reshape(-1, shape[-1])  # (M, d)
        if token_mask is None:
            out, router = self._tokens(h, stats)
            return out.reshape(shape), router
        real = token_mask.reshape(-1).nonzero().squeeze(1)  # (M_real,)
        out, router = self._tokens(h[real], stats)
        return torch.zeros_like(h).index_copy(0, real, out.to(h.dtype)).reshape(shape), router

    def _tokens(self, h: torch.Tensor, stats: bool) -> tuple[torch.Tensor, RouterStats | None]:
        """`forward` on (M, d) tokens."""
        logits, probs, weights, experts = self.route(h)
        few = 0 < experts.numel() <= self.n_experts  # e.g. one token
        if not stats and (few or static_shapes(h)):
            return (self.combine_gathered if few else self.combine_dense)(h, weights, experts), None
        counts = torch.bincount(experts.reshape(-1), minlength=self.n_experts)  # (n,)
        if few:
            out = self.combine_gathered(h, weights, experts)
        else:
            out = self.combine(h, weights, experts, counts)
        if not stats:
            return out, None
        M = max(h.shape[0], 1)  # no token (all padding): zero statistics
        fraction = counts.to(probs.dtype) / (M * self.top_k)  # f_i
        aux = self.n_experts * (fraction * probs.sum(0) / M).sum()
        z = torch.logsumexp(logits, dim=-1).square().sum() / M
        return out, RouterStats(aux, z, counts, logits)
