"""MixCon language model: embeddings, n_blocks × L pre-norm layers, tied LM head (DESIGN.md §1)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixcon.checks import check_attention_mask, is_integer
from mixcon.config import MixConConfig
from mixcon.generation.cache import ConbaCache, MixConCache
from mixcon.generation.cuda_graphs import DecodeGraphs, weight_pointers
from mixcon.layers.attention import Attention, rope_angles
from mixcon.layers.conba import Conba, SegmentedPrefill
from mixcon.layers.context import DecodeStep, ForwardContext
from mixcon.layers.linear import Linear
from mixcon.layers.mlp import SwiGLU
from mixcon.layers.moe import MoE, RouterStats
from mixcon.layers.norm import GatedRMSNorm, RMSNorm
from mixcon.models.files import read_model, write_model
from mixcon.models.padding import check_padding, pads_first
from mixcon.ops.contract import check_seq_idx
from mixcon.ops.cross_entropy import IGNORE, linear_cross_entropy
from mixcon.ops.dtypes import compute_dtype, resolve_dtype


def _router_logits(stats: list[RouterStats], token_mask: torch.Tensor | None, B: int, T: int) -> list[torch.Tensor]:
    """Each MoE layer's router logits (B, T, n_experts), a pad's 0: the MoE layers routed the real tokens only."""
    rows = None if token_mask is None or bool(token_mask.all()) else token_mask.flatten().nonzero().squeeze(1)
    return [(s.logits if rows is None else s.logits.new_zeros(B * T, s.logits.shape[1]).index_copy(0, rows, s.logits)
             ).view(B, T, -1) for s in stats]


@dataclass
class MixConOutput:
    """What `MixConForCausalLM.forward` returns: logits, and the losses when labels are given."""

    logits: torch.Tensor | None  # (B, T, V); None when asked not to return them
    loss: torch.Tensor | None = None  # lm_loss + router_loss
    lm_loss: torch.Tensor | None = None  # mean over the scored tokens (nan when none is scored)
    router_loss: torch.Tensor | None = None  # aux coefficient × aux_loss + z coefficient × z_loss
    aux_loss: torch.Tensor | None = None  # load balancing, mean over MoE layers (0 without MoE)
    z_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None  # (n_moe_layers, n_experts) tokens routed
    last_hidden_state: torch.Tensor | None = None  # (B, T, d_model) after the final norm, with return_logits=False
    # With output_hidden_states: the embeddings, then each layer's output (the last after the final norm), as
    # transformers' models give them: n_layers + 1 tensors (B, T, d_model).
    hidden_states: tuple[torch.Tensor, ...] | None = None
    # With output_router_logits: each MoE layer's router logits (B·T, n_experts), a pad's 0 (transformers' layout).
    router_logits: tuple[torch.Tensor, ...] | None = None


class MixConLayer(nn.Module):
    """x = x + mixer(norm(x)); x = x + ffn(norm(x)), mixer ∈ {attention, Conba}, ffn ∈ {MLP, MoE}."""

    # Activation checkpointing (`training.distributed.checkpoint_layers`): `recompute(function, *inputs)` runs the
    # layer keeping only its inputs, recomputed in the backward, while training with gradients on; None: plainly.
    recompute: Callable[..., Any] | None = None

    def __init__(self, config: MixConConfig, layer_idx: int, mixer: str, ffn: str) -> None:
        super().__init__()
        self.mixer_kind, self.ffn_kind = mixer, ffn
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = Attention(config, layer_idx) if mixer == "attention" else Conba(config, layer_idx)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = (MoE(config.d_model, config.expert_hidden_size, config.n_experts, config.top_k, init_std=None)
                    if ffn == "moe" else SwiGLU(config.d_model, config.mlp_hidden))

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, RouterStats | None]:
        if self.recompute is not None and self.training and torch.is_grad_enabled():
            return self.recompute(self._forward, h, ctx)
        return self._forward(h, ctx)

    def _forward(self, h: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, RouterStats | None]:
        h = h + self.mixer(self.mixer_norm(h), ctx)
        if self.ffn_kind == "mlp":
            return h + self.ffn(self.ffn_norm(h)), None
        f, stats = self.ffn(self.ffn_norm(h), token_mask=ctx.token_mask)  # pads count in no router statistic
        return h + f, stats

    def decode(self, h: torch.Tensor, cache: tuple[torch.Tensor, ...], step: DecodeStep) -> torch.Tensor:
        """One new token per row through the layer, (B, 1, d) -> (B, 1, d); updates its cache tensors."""
        h = h + self.mixer.decode(self.mixer_norm(h), cache, step)
        f = self.ffn_norm(h)
        return h + (self.ffn(f, stats=False)[0] if self.ffn_kind == "moe" else self.ffn(f))  # ffn may be wrapped


def _positions_to_keep(logits_to_keep: int | torch.Tensor, T: int, has_labels: bool) -> slice | torch.Tensor:
    """The positions whose logits a forward computes: the last `logits_to_keep` (0: all), or the given indices."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 1 and not has_labels \
            and not logits_to_keep.is_floating_point() and logits_to_keep.dtype != torch.bool:
        if logits_to_keep.numel() and not bool(((logits_to_keep >= -T) & (logits_to_keep < T)).all()):
            raise ValueError(f"logits_to_keep: position indices must lie in [-{T}, {T}) for {T} input positions")
        return logits_to_keep
    if not (is_integer(logits_to_keep) and logits_to_keep >= 0) or (logits_to_keep and has_labels):
        raise ValueError(f"logits_to_keep={logits_to_keep!r} must be an integer >= 0 or a 1-D tensor of position "
                         "indices, and 0 when labels are given")
    return slice(-logits_to_keep, None)  # -0: all of them


class MixConForCausalLM(nn.Module):
    """The MixCon language model: embedding, `config.layout()`'s layers (attention or Conba mixer, MLP
    or MoE feed-forward, each pre-normed with a residual), final norm and LM head (tied by default).

    `forward` scores or trains (labels, padding masks, packed documents via `seq_idx`, a cache to
    continue); `new_cache` + `forward`, or `generate`, decode with O(1) Conba steps and a KV cache for the
    attention layers only; `save_pretrained` / `from_pretrained` write and read safetensors + config.json.
    """

    def __init__(self, config: MixConConfig) -> None:
        super().__init__()
        if not isinstance(config, MixConConfig):
            raise TypeError(f"MixConForCausalLM takes a MixConConfig (MixConConfig.from_dict for a mapping), got "
                            f"{type(config).__name__}")
        config.validate()  # again: a dataclass's fields may have been changed since it was made
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            MixConLayer(config, i, mixer, ffn) for i, (mixer, ffn) in enumerate(config.layout())
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self._decode_step: Callable[..., torch.Tensor] | None = None  # set by compile_decode
        self._decode_graphs: DecodeGraphs | None = None  # set by capture_decode
        self._compiled: dict[str, dict[str, Any]] = {}  # compile_decode / compile_prefill / capture_decode: arguments
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, output projections scaled by 1/sqrt(2·n_layers), SSM init for Conba (its
        depthwise conv: PyTorch's default, as Mamba-2's), norm weights 1."""
        for name, module in self.named_modules():
            if not isinstance(module, nn.Conv1d):  # (a Conba's, initialised with it)
                self.init_module(name, module)

    @torch.no_grad()
    def init_module(self, name: str, module: nn.Module) -> None:
        """`reset_parameters` for the parameters `module` (named `name` in this model) holds itself, and for a
        Conba its conv's too; meta ones stay as they are."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        if isinstance(module, (nn.Linear, nn.Embedding)) and not module.weight.is_meta:
            is_out = name.endswith(("out_proj", "down")) and ".sel." not in name
            nn.init.normal_(module.weight, 0.0, out_std if is_out else std)
        elif isinstance(module, MoE) and not module.w_down.is_meta:
            nn.init.normal_(module.w_gate_up, 0.0, std)
            nn.init.normal_(module.w_down, 0.0, out_std)
        elif isinstance(module, Conba):
            module.reset_ssm_parameters()
            self.init_module(f"{name}.conv1d", module.conv1d)
        elif isinstance(module, nn.Conv1d) and not module.weight.is_meta:
            module.reset_parameters()
        elif isinstance(module, (RMSNorm, GatedRMSNorm)) and not module.weight.is_meta:
            nn.init.ones_(module.weight)

    def tie_weights(self) -> None:
        """Share the LM head's weight with the embedding's when the config ties them: again after `to_empty` (which
        gives shared parameters separate storage), as transformers' `tie_weights`."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ------------------------------------------------------------------ sizes
    def num_parameters(self, active: bool = False) -> int:
        """Parameter count; with active=True, those one token uses (top_k of n experts per MoE layer)."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for layer in self.layers:
                if isinstance(layer.ffn, MoE):
                    per_expert = (layer.ffn.w_gate_up.numel() + layer.ffn.w_down.numel()) // layer.ffn.n_experts
                    total -= (layer.ffn.n_experts - layer.ffn.top_k) * per_expert
        return total

    def summary(self) -> str:
        """Block layout and parameter counts."""
        c = self.config
        lines = [f"MixCon: {c.n_blocks} blocks × {c.layers_per_block} layers, d_model={c.d_model}, "
                 f"vocab={c.vocab_size}",
                 f"layout (A=attention C=Conba / D=dense MLP M=MoE): {c.layout_string()}"]
        for i, layer in enumerate(self.layers):
            n = sum(p.numel() for p in layer.parameters())
            lines.append(f"  layer {i:3d}: {layer.mixer_kind:9s} + {layer.ffn_kind:3s}  {n:,} params")
        lines.append(f"parameters: {self.num_parameters():,} total, {self.num_parameters(active=True):,} "
                     f"active per token")
        return "\n".join(lines)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[MixConForCausalLM]:
        """Eval mode inside the block; then the mode the model had, also after an exception."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ forward
    def new_cache(self, batch_size: int, max_length: int = 256) -> MixConCache:
        """An empty decoding cache on the model's device and dtype."""
        p = self.embed.weight
        return MixConCache(self.config, batch_size, max_length, dtype=p.dtype, device=p.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: MixConCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = True,
        seq_idx: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        output_router_logits: bool = False,
    ) -> MixConOutput:
        """Logits (and the loss, with labels) of a batch of token rows.

        input_ids: (B, T), the only positional argument.
        labels: (B, T) the target of each position, already shifted; -100 (and a pad's) is not scored.
        attention_mask: (B, T) 1 for real tokens, 0 for padding, anywhere in a row (each row's real tokens run as
            one sequence), except that a forward continuing a cache takes pads only before a row's first token.
        cache: continued and updated; one new token per row in eval mode is one `decode_step` (compiled after
            `compile_decode`).
        logits_to_keep: > 0, logits of the last that many positions only (a prefill needs one); a 1-D tensor, those
            positions (as in transformers); 0, all.
        return_logits: False, no logits: the final hidden states (`last_hidden_state`, at the positions
            `logits_to_keep` says) and, with labels, the loss computed chunk by chunk without ever holding all the
            logits (`ops.linear_cross_entropy`, for training; `ops.linear_token_scores` scores tokens so).
        seq_idx: (B, T) non-decreasing integers packing documents into a row (as in mamba_ssm and
            flash-linear-attention): no state, conv tap or attention crosses a document start; only without a
            cache and without padding.
        output_hidden_states: every layer's output too.
        inputs_embeds: (B, T, d_model) in place of input_ids: vectors that enter where the embeddings would, in
            their dtype (soft prompts, PEFT's prompt tuning).
        output_router_logits: every MoE layer's router logits too."""
        T = self.check_inputs(input_ids, labels, attention_mask, cache, seq_idx, inputs_embeds)[1]
        keep = _positions_to_keep(logits_to_keep, T, labels is not None)
        token_mask = attention_mask.bool() if attention_mask is not None else None
        if labels is not None and token_mask is not None:  # a pad predicts nothing: its target is not scored
            labels = labels.masked_fill(~token_mask, IGNORE)
        states: list[torch.Tensor] | None = [] if output_hidden_states else None
        order = None
        if token_mask is not None and (cache is None or cache.seqlen == 0):
            order = pads_first(token_mask, fresh_cache=cache is not None)
        if order is not None:
            token_mask = token_mask.gather(1, order)
        if cache is None:
            h, stats = self._layers(self._embed(input_ids, inputs_embeds, order), token_mask, None, seq_idx, states)
        else:
            try:
                if (T == 1 and input_ids is not None and labels is None and return_logits and states is None
                        and not output_router_logits and isinstance(keep, slice) and self._decodes_in_one_step()
                        and (token_mask is None or bool(token_mask.all()))):  # one plain token per row
                    return self._output(self._decode(input_ids, cache), None, [])
                cache.reserve(cache.seqlen + T)
                cache.key_mask[:, cache.seqlen: cache.seqlen + T] = True if token_mask is None else token_mask
                h, stats = self._layers(self._embed(input_ids, inputs_embeds, order), token_mask, cache, seq_idx,
                                        states)
            except BaseException:  # some layers moved on, others not: the cache no longer describes one sequence
                cache.broken = True
                raise
            cache.seqlen += T
            cache.positions += T if token_mask is None else token_mask.sum(1)
        router_logits = _router_logits(stats, token_mask, *h.shape[:2]) if output_router_logits else None
        if order is not None:  # each position's output back in its place
            back = order.argsort(dim=1)[..., None]

            def restore(t: torch.Tensor) -> torch.Tensor:
                return t.gather(1, back.expand_as(t))

            h = restore(h)
            states = None if states is None else [restore(s) for s in states]
            router_logits = None if router_logits is None else [restore(r) for r in router_logits]
        if not return_logits:
            out = self._output(None, labels, stats, h=self.norm(h[:, keep]))
        else:
            out = self._output(self.lm_head(self.norm(h[:, keep])), labels, stats)
        if states is not None:
            out.hidden_states = (*states[:-1], self.norm(states[-1]))
        if router_logits is not None:
            out.router_logits = tuple(r.flatten(0, 1) for r in router_logits)
        return out

    def _decodes_in_one_step(self) -> bool:
        """Whether a one-token forward may take `decode_step`: eval mode, no autograd, no hooks it would skip."""
        return not self.training and not self._needs_grad() and not self._hooked()

    def _hooked(self) -> bool:
        """Whether a layer or its mixer has forward hooks: `decode_step` calls their `decode` directly, so a step then
        takes the general path, which calls them (and their hooks)."""
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return True
        for layer in self.layers._modules.values():  # `_modules`, not nn.Module.__getattr__: ~10 us less per step
            for m in (layer, layer._modules["mixer"]):
                if m._forward_hooks or m._forward_pre_hooks:
                    return True
        return False

    def _needs_grad(self) -> bool:
        """Whether this forward builds an autograd graph (a decoding step's in-place updates would break it)."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
               order: torch.Tensor | None = None) -> torch.Tensor:
        """The layers' input (B, T, d_model): the embeddings of input_ids, or `inputs_embeds` in the embeddings'
        dtype; with `order` (B, T), each row's positions in that order."""
        if inputs_embeds is None:
            return self.embed(input_ids if order is None else input_ids.gather(1, order))
        inputs_embeds = inputs_embeds.to(self.embed.weight.dtype)
        return inputs_embeds if order is None else inputs_embeds.gather(1, order[..., None].expand_as(inputs_embeds))

    def _layers(self, h: torch.Tensor, token_mask: torch.Tensor | None, cache: MixConCache | None,
                seq_idx: torch.Tensor | None, states: list[torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, list[RouterStats]]:
        """Every layer on the embeddings h (B, T, d_model): hidden states before the final norm, and the MoE
        stats; `states`, if given, collects the embeddings and each layer's output."""
        B, T = h.shape[:2]
        ctx = ForwardContext.build(token_mask, B, T, cache, h.device, seq_idx)
        if ctx.token_mask is not None:  # pads enter as zeros: whatever their embeddings, nothing non-finite
            h = h.masked_fill(~ctx.token_mask[..., None], 0)
        stats: list[RouterStats] = []
        for layer in self.layers:
            if states is not None:
                states.append(h)
            h, s = layer(h, ctx)
            if s is not None:
                stats.append(s)
        if states is not None:
            states.append(h)
        if ctx.token_mask is not None and h.requires_grad:  # pads leave as the zeros they are, and no gradient
            # reaches them: a pad's loss (labels there) would pass the norms' slope at a zero row, 1/sqrt(eps),
            # back from layer to layer until it overflowed to inf and made every weight's gradient nan
            h = h.masked_fill(~ctx.token_mask[..., None], 0)
        return h, stats

    def _decode(self, input_ids: torch.Tensor, cache: MixConCache) -> torch.Tensor:
        """One new token per row after `cache` (B, 1) -> logits (B, 1, V), by `decode_step`; the cache's
        counters (positions, ring slots) move here, outside what a compiler traces."""
        cache.reserve(cache.seqlen + 1)
        cache.key_mask[:, cache.seqlen] = True
        index = torch.full((1,), cache.seqlen, dtype=torch.long, device=input_ids.device)
        step = self._decode_step or self.decode_step
        graphs = self._decode_graphs if self._decode_graphs is not None and self._decode_graphs.applies(input_ids) \
            else None
        # Eager, attention reads the filled positions only; compiled or replayed, the whole capacity (one shape
        # per capacity).
        length = None if self._decode_step is not None or graphs is not None else cache.seqlen + 1
        # Standard strides: a compiled step guards on them, and a prompt's last column ((B, 1) with stride T)
        # differs from a sampled token's, which would recompile the step with dynamic shapes (slower).
        ids = input_ids.clone(memory_format=torch.contiguous_format)
        caches = [layer.tensors(length) for layer in cache.layers]
        args = (ids, cache.positions, cache.key_mask[:, :length], index, caches)
        if graphs is None:
            logits = step(*args)
        else:
            if cache.weights is None:  # once per cache: weights replaced while it is decoded are not looked for
                cache.weights = weight_pointers(self)
            logits = graphs(step, *args, weights=cache.weights)
        for layer in cache.layers:
            if isinstance(layer, ConbaCache):
                layer.advance()
        cache.seqlen += 1
        cache.positions += 1
        return logits

    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                    index: torch.Tensor, caches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """One decoding step as a function of tensors only (what `compile_decode` compiles).

        input_ids (B, 1); positions (B,) of the new tokens; key_mask (B, L) with the new position already
        set; index (1,) the new position in the cache; per layer, its cache tensors
        (`AttentionCache.tensors(L)` / `ConbaCache.tensors()`), updated in place; L: the capacity, or any
        length past the new position. Returns (B, 1, V).
        """
        c = self.config
        rope = None
        if c.attn_rope and any(kind == "attention" for kind, _ in c.layout()):
            rope = rope_angles(positions[:, None], c.attn_head_dim, c.rope_theta, compute_dtype(self.embed.weight))
        step = DecodeStep(index, key_mask[:, None, None, :], rope)
        h = self.embed(input_ids)  # (B, 1, d)
        for layer, tensors in zip(self.layers, caches, strict=True):
            h = layer.decode(h, tensors, step)
        return self.lm_head(self.norm(h))

    def compile_decode(self, **compile_kwargs: Any) -> None:
        """Decode through `torch.compile(self.decode_step, **compile_kwargs)` from now on: one graph
        for all layers, compiled on the first step (per batch size; capacity becomes dynamic after
        the first change). Decoding is dispatch-bound in eager mode; see docs/benchmarks.md."""
        self._decode_step = torch.compile(self.decode_step, **compile_kwargs)
        self._compiled["decode"] = compile_kwargs
        if self._decode_graphs is not None:  # captured from the step before
            self._decode_graphs.clear()

    def capture_decode(self, max_graphs: int = 16) -> None:
        """Replay decoding steps on CUDA from CUDA graphs from now on (eager steps, or `compile_decode`'s): a
        step's kernels launched at once, where decoding a small model is bound by launching them. A graph is
        captured after the first step on each set of cache tensors (a new cache, one that grew, each phase of a
        ring of tau > 1 Conba states) and weights (looked up once per cache, at its first such step: weights
        replaced while a cache is decoded need a new cache); `max_graphs`: how many are kept. Steps elsewhere,
        or under autocast, run as before, and so do all after a step that could not be captured (a warning).
        Attention reads the cache's whole capacity, as when compiled."""
        if not (is_integer(max_graphs) and max_graphs >= 1):
            raise ValueError(f"capture_decode: max_graphs={max_graphs!r} must be an integer >= 1")
        self._decode_graphs = DecodeGraphs(max_graphs)
        self._compiled["graphs"] = {"max_graphs": max_graphs}

    def compile_prefill(self, segment: int = 512, chunk: int | None = None, **compile_kwargs: Any) -> None:
        """Run the Conba layers of forwards without autograd (prefill, evaluation) `segment` steps at a
        time through one `torch.compile(Conba.mix, dynamic=False, **compile_kwargs)` shared by every layer,
        chained through the conv tails and states: one static shape for every prompt length (per batch
        size and padding or not), compiled on the first prompt of at least `segment` tokens; the rest
        of a prompt shorter than a segment runs eager. `chunk`: the scan's chunk length there (default
        min(conba_chunk, 32), the faster on the CPUs of docs/benchmarks.md §6). Training is unchanged."""
        chunk = min(self.config.conba_chunk, 32) if chunk is None else chunk
        if not (is_integer(chunk) and chunk >= 1 and is_integer(segment) and segment >= 1):
            raise ValueError(f"compile_prefill: segment={segment!r} and chunk={chunk!r} must be integers >= 1")
        prefill = SegmentedPrefill(torch.compile(Conba.mix, **{"dynamic": False, **compile_kwargs}), segment, chunk)
        for layer in self.layers:
            if isinstance(layer.mixer, Conba):
                layer.mixer.prefill = prefill
        self._compiled["prefill"] = {"segment": segment, "chunk": chunk, **compile_kwargs}

    def uncompile(self) -> None:
        """Undo `compile_decode`, `compile_prefill` and `capture_decode`: eager decoding and prefill from now on."""
        self._decode_step = None
        self._decode_graphs = None
        for layer in self.layers:
            if isinstance(layer.mixer, Conba):
                layer.mixer.prefill = None
        self._compiled.clear()

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and `copy.deepcopy`: compiled functions stay behind (a compiled step is bound to this model);
        a copy compiles its own, with the same arguments, in `__setstate__`."""
        return {**super().__getstate__(), "_decode_step": None, "_decode_graphs": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_decode_graphs", None)  # pickled before capture_decode existed
        compiled = self.__dict__.setdefault("_compiled", {})
        if "decode" in compiled:
            self.compile_decode(**compiled["decode"])
        if "prefill" in compiled:
            self.compile_prefill(**compiled["prefill"])
        if "graphs" in compiled:
            self.capture_decode(**compiled["graphs"])

    def _output(self, logits: torch.Tensor | None, labels: torch.Tensor | None, stats: list[RouterStats],
                h: torch.Tensor | None = None) -> MixConOutput:
        """The output; the loss from the logits, or from the final hidden states `h` through the fused head."""
        ref = logits if logits is not None else h
        zero = ref.new_zeros((), dtype=compute_dtype(ref))
        aux = torch.stack([s.aux_loss for s in stats]).mean() if stats else zero
        z = torch.stack([s.z_loss for s in stats]).mean() if stats else zero
        counts = torch.stack([s.counts for s in stats]) if stats else None
        out = MixConOutput(logits=logits, aux_loss=aux, z_loss=z, expert_counts=counts,
                           last_hidden_state=h if logits is None else None)
        if labels is not None:
            out.lm_loss = (linear_cross_entropy(h, self.lm_head.weight, labels) if logits is None else
                           F.cross_entropy(logits.flatten(0, 1).to(compute_dtype(logits)), labels.flatten().long(),
                                           ignore_index=IGNORE))
            out.router_loss = self.config.router_aux_loss_coef * aux + self.config.router_z_loss_coef * z
            out.loss = out.lm_loss + out.router_loss
        return out

    def check_inputs(self, input_ids: torch.Tensor | None, labels: torch.Tensor | None,
                     attention_mask: torch.Tensor | None, cache: MixConCache | None,
                     seq_idx: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None) -> tuple[int, int]:
        """Raise a named error for inputs `forward` would refuse; (B, T) of the inputs otherwise."""
        device = self.embed.weight.device
        for name, value in (("input_ids", input_ids), ("labels", labels), ("attention_mask", attention_mask),
                            ("seq_idx", seq_idx), ("inputs_embeds", inputs_embeds)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
            if value is not None and value.device != device:
                raise ValueError(f"{name} is on {value.device}, the model on {device}: move it there "
                                 f"(.to('{device}'))")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give input_ids (B, T) or inputs_embeds (B, T, d_model): one of them")
        if inputs_embeds is not None:
            d = self.config.d_model
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[2] != d or not inputs_embeds.is_floating_point():
                raise ValueError(f"inputs_embeds must be a floating tensor (B, T, d_model={d}), got "
                                 f"{inputs_embeds.dtype} {tuple(inputs_embeds.shape)}")
            B, T = inputs_embeds.shape[:2]
        else:
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be an integer tensor (B, T), got {input_ids.dtype} "
                                 f"{tuple(input_ids.shape)}")
            B, T = input_ids.shape
        given = "input_ids" if input_ids is not None else "inputs_embeds"
        if B == 0 or T == 0:
            raise ValueError(f"{given} must hold at least one row and one token (B, T >= 1), got {(B, T)}")
        V = self.config.vocab_size
        if input_ids is not None:
            lo, hi = (int(v) for v in input_ids.aminmax())
            if lo < 0 or hi >= V:
                raise ValueError(f"input_ids must lie in [0, vocab_size={V}), got values in [{lo}, {hi}]")
        if labels is not None:
            if labels.shape != (B, T) or labels.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"labels must be an integer tensor of the shape of {given} {(B, T)}, got "
                                 f"{labels.dtype} {tuple(labels.shape)}")
            lo, hi = (int(v) for v in labels.masked_fill(labels == IGNORE, 0).aminmax())
            if lo < 0 or hi >= V:
                raise ValueError(f"labels must lie in [0, vocab_size={V}) or be {IGNORE} (ignored), "
                                 f"got values in [{lo}, {hi}]")
        if attention_mask is not None:
            check_attention_mask(attention_mask, (B, T), given)
        if cache is not None:
            if cache.broken:
                raise ValueError("cache: a forward raised while updating it, leaving its layers at different "
                                 "positions; start again from a new one (model.new_cache)")
            if cache.batch_size != B:
                raise ValueError(f"cache was made for batch_size={cache.batch_size}, {given} has B={B}")
            if cache.key_mask.is_inference() and not torch.is_inference_mode_enabled():
                raise ValueError("cache holds tensors made under torch.inference_mode() (it was made there, or grew "
                                 "or was reordered there), which cannot be updated outside it: continue it under "
                                 "inference_mode, or make and fill it outside inference_mode (torch.no_grad)")
            if not cache.fits(self.config):
                raise ValueError("cache was made for another model (its layers or their shapes differ from "
                                 "this model's): make it with model.new_cache")
            if not cache.claim(self):
                raise ValueError("cache holds what another model computed (a cache continues only the model "
                                 "whose forwards filled it; another model starts from model.new_cache)")
            weight = self.embed.weight
            if (cache.dtype, cache.key_mask.device) != (weight.dtype, weight.device):
                raise ValueError(f"cache holds {cache.dtype} on {cache.key_mask.device}, the model computes in "
                                 f"{weight.dtype} on {weight.device}: make it with model.new_cache")
        if cache is not None and cache.seqlen > 0 and attention_mask is not None \
                and not bool(attention_mask.bool().all()):
            check_padding(attention_mask.bool(), cache)
        if seq_idx is not None:
            check_seq_idx(seq_idx, (B, T))
            if cache is not None:
                raise ValueError("seq_idx (packed documents) is for forwards without a cache (training, "
                                 "scoring); give each document its own row to decode it")
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError("seq_idx cannot be combined with padding (zeros in attention_mask): give pad "
                                 "tokens a document index of their own and labels -100")
        return B, T

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Prefill, then one O(1) Conba step per token; see `mixcon.generation.generate`."""
        from mixcon.generation.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write model.safetensors and config.json into `directory`, each whole or not at all (an earlier sharded
        save's weights there are removed)."""
        directory = Path(directory)
        write_model(self, self.config.to_json(), directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype | str | None = None) -> MixConForCausalLM:
        """Load a model written by `save_pretrained` (or a training checkpoint's model, or the transformers
        wrapper's `save_pretrained`, sharded or not), in eval mode; missing or mismatched weights are an error. `dtype`:
        the parameters' dtype (or its name, "bf16" / "bfloat16"); by default ("auto" or None) the one the weights were
        saved in (fp32 if they mix several)."""
        dtype = resolve_dtype(dtype)
        if torch.device(device).type == "meta":
            raise ValueError("from_pretrained: device='meta' holds no weights; build the model under "
                             "`with torch.device('meta'):` to size it without memory")
        config, state = read_model(Path(directory), device)
        if dtype is None:
            saved = {t.dtype for t in state.values() if t.is_floating_point()}
            dtype = saved.pop() if len(saved) == 1 else torch.float32
        with torch.device("meta"):
            model = cls(config).to(dtype)
        model.to_empty(device=device)
        model.tie_weights()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # missing, unexpected or misshapen weights, each named
            problems = " ".join(str(e).split())  # torch's list of them, on one line
            raise ValueError(f"{directory}: its weights do not fit its config.json: {problems}") from e
        return model.eval()  # as transformers' from_pretrained: `.train()` to train (noise is on in training mode)
