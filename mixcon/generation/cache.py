"""Hybrid decoding cache (DESIGN.md §4): K/V for attention layers, state + conv tail for Conba.

Allocation and the memory formula share one set of shape functions, so `cache_nbytes(config, ...)`
is what `MixConCache(...).nbytes()` allocates.
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import Any

import torch

from mixcon.checks import is_integer
from mixcon.config import MixConConfig
from mixcon.ops.dtypes import compute_dtype_for


def attention_cache_shape(config: MixConConfig, batch_size: int, capacity: int) -> tuple[int, ...]:
    """Shape of K (and of V) for one attention layer: (B, n_kv_heads, capacity, head_dim)."""
    return (batch_size, config.n_kv_heads, capacity, config.attn_head_dim)


def conba_conv_shape(config: MixConConfig, batch_size: int) -> tuple[int, ...]:
    """The conv tail: the last (conv - 1) steps of x, k, q: (B, conv - 1, H·P + 2·G·N)."""
    channels = config.conba_inner + 2 * config.conba_groups * config.conba_state
    return (batch_size, config.conba_conv - 1, channels)


def conba_states_shape(config: MixConConfig, batch_size: int) -> tuple[int, ...]:
    """The ring of S_{t-tau+1} .. S_t (one state when tau = 0): (R, B, H, P, N), each slot contiguous."""
    R = max(config.conba_delay, 1)
    return (R, batch_size, config.conba_heads, config.conba_head_dim, config.conba_state)


def layer_cache_nbytes(
    config: MixConConfig, mixer: str, batch_size: int, context: int, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes one layer's cache holds for `context` tokens."""
    item = torch.empty((), dtype=dtype).element_size()
    if mixer == "attention":
        return 2 * math.prod(attention_cache_shape(config, batch_size, context)) * item
    state_item = torch.empty((), dtype=compute_dtype_for(dtype)).element_size()
    return (math.prod(conba_conv_shape(config, batch_size)) * item
            + math.prod(conba_states_shape(config, batch_size)) * state_item)


def cache_nbytes(config: MixConConfig, batch_size: int, context: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the whole decoding cache for `context` tokens (the formula the cache allocates)."""
    if not (is_integer(batch_size) and batch_size >= 1 and is_integer(context) and context >= 0):
        raise ValueError(f"cache_nbytes: batch_size={batch_size!r} must be an integer >= 1 and context={context!r} "
                         "an integer >= 0")
    return sum(layer_cache_nbytes(config, mixer, batch_size, context, dtype) for mixer, _ in config.layout())


def _rows(t: torch.Tensor, index: torch.Tensor, in_place: bool) -> torch.Tensor:
    """The rows `index` of `t`, in that order: a new tensor, or written over `t` (of as many rows) when `in_place`."""
    return t.copy_(t.index_select(0, index)) if in_place else t.index_select(0, index)


class AttentionCache:
    """K and V of one attention layer, (B, n_kv, capacity, head_dim), grown by doubling."""

    def __init__(self, config: MixConConfig, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        shape = attention_cache_shape(config, batch_size, capacity)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def grow(self, capacity: int) -> None:
        """Hold `capacity` positions: K and V padded with zeros (the mask keeps them out)."""
        pad = [0, 0, 0, capacity - self.k.shape[2]]
        self.k = torch.nn.functional.pad(self.k, pad)
        self.v = torch.nn.functional.pad(self.v, pad)

    def update(self, k: torch.Tensor, v: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, n_kv, T, hd) at `offset`; return all keys and values so far. With autograd, new tensors
        replace the old ones (which earlier forwards may have saved for their backward)."""
        end = offset + k.shape[2]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or self.k.requires_grad):
            self.k = torch.cat((self.k[:, :, :offset], k, self.k[:, :, end:]), dim=2)
            self.v = torch.cat((self.v[:, :, :offset], v, self.v[:, :, end:]), dim=2)
        else:
            self.k[:, :, offset:end] = k
            self.v[:, :, offset:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def tensors(self, length: int | None = None) -> tuple[torch.Tensor, ...]:
        """What a decoding step reads and writes: (K, V), whole or their first `length` positions (views)."""
        if length is None:
            return self.k, self.v
        return self.k[:, :, :length], self.v[:, :, :length]

    def select_rows(self, index: torch.Tensor, in_place: bool = False) -> None:
        self.k, self.v = _rows(self.k, index, in_place), _rows(self.v, index, in_place)

    def detach_(self) -> None:
        self.k, self.v = self.k.detach(), self.v.detach()

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class ConbaCache:
    """Conv tail and the ring of the most recent R = max(tau, 1) states of one Conba layer.

    A decoding step reads S_t and the oldest slot, then writes S_{t+1} over the oldest slot. The
    slots are separate tensors, so that a compiled step sees no aliasing between its inputs.
    """

    def __init__(self, config: MixConConfig, batch_size: int, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        self.conv = torch.zeros(conba_conv_shape(config, batch_size), dtype=dtype, device=device)
        R, *shape = conba_states_shape(config, batch_size)
        self.slots = [torch.zeros(shape, dtype=compute_dtype_for(dtype), device=device) for _ in range(R)]
        self.ptr = 0  # ring slot of the oldest state; the newest is at ptr - 1

    @property
    def state(self) -> torch.Tensor:
        """S_t: (B, H, P, N)."""
        return self.slots[(self.ptr - 1) % len(self.slots)]

    @property
    def oldest(self) -> torch.Tensor:
        """The oldest slot, S_{t+1-R}: the delayed state the next step reads (tau = R), then overwrites."""
        return self.slots[self.ptr % len(self.slots)]

    def advance(self) -> None:
        """Make the oldest slot, just overwritten with S_{t+1}, the newest."""
        self.ptr += 1

    def ordered(self) -> torch.Tensor:
        """The ring oldest first: (B, R, H, P, N)."""
        R = len(self.slots)
        return torch.stack([self.slots[(self.ptr + i) % R] for i in range(R)], dim=1)

    def set_ordered(self, states: torch.Tensor) -> None:
        """Replace the ring by (B, R, H, P, N) states, oldest first (new tensors with autograd, as in `update`)."""
        if torch.is_grad_enabled() and states.requires_grad:
            self.slots = [s.contiguous() for s in states.unbind(1)]
        else:
            for slot, s in zip(self.slots, states.unbind(1), strict=True):
                slot.copy_(s)
        self.ptr = 0

    def tensors(self, length: int | None = None) -> tuple[torch.Tensor, ...]:
        """What a decoding step reads and writes: (conv tail, S_t, oldest slot); `length` concerns only K/V."""
        return self.conv, self.state, self.oldest

    def select_rows(self, index: torch.Tensor, in_place: bool = False) -> None:
        self.conv = _rows(self.conv, index, in_place)
        self.slots = [_rows(s, index, in_place) for s in self.slots]

    def detach_(self) -> None:
        self.conv = self.conv.detach()
        self.slots = [s.detach() for s in self.slots]

    def nbytes(self) -> int:
        return self.conv.nbytes + sum(s.nbytes for s in self.slots)


class MixConCache:
    """Decoding state of a batch: one entry per layer, plus which positions hold real tokens."""

    def __init__(self, config: MixConConfig, batch_size: int, max_length: int = 256,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        if not (is_integer(batch_size) and batch_size >= 1 and is_integer(max_length) and max_length >= 1):
            raise ValueError(f"MixConCache: batch_size={batch_size!r} and max_length={max_length!r} must be integers "
                             ">= 1")
        self.config = config
        self.dtype = dtype  # of K/V and conv tails (Conba states: `compute_dtype_for(dtype)`)
        self.layers: list[AttentionCache | ConbaCache] = [
            AttentionCache(config, batch_size, max_length, dtype, device) if mixer == "attention"
            else ConbaCache(config, batch_size, dtype, device)
            for mixer, _ in config.layout()
        ]
        self.seqlen = 0  # positions written so far, pads included
        self.broken = False  # a forward raised half-way through updating it
        self.key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row
        self.limit: int | None = None  # the positions growing stops at (generate: the prompt and max_new_tokens)
        self.owner: weakref.ref | None = None  # the model whose forwards filled it, from the first one on
        self.weights: tuple[int, ...] | None = None  # its model's `weight_pointers`, for CUDA-graph steps

    def claim(self, model: torch.nn.Module) -> bool:
        """Whether `model` may continue this cache: any model while it is empty (or unpickled: it then
        becomes that model's), else only the model that filled it (the states are that model's)."""
        if self.seqlen == 0 or self.owner is None:
            self.owner = weakref.ref(model)
        return self.owner() is model

    def __getstate__(self) -> dict[str, Any]:  # pickling: a weak reference does not pickle, pointers mean nothing
        return {**self.__dict__, "owner": None, "weights": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"weights": None, **state})  # (caches pickled before `weights` existed have none)

    def __copy__(self) -> MixConCache:  # the copy continues the same model
        new = object.__new__(MixConCache)
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> MixConCache:
        """A copy of the cache continues its model, or that model's copy when the two are copied together."""
        new = object.__new__(MixConCache)
        memo[id(self)] = new
        new.__dict__.update({key: copy.deepcopy(value, memo) for key, value in self.__dict__.items()
                             if key not in ("owner", "weights")})
        new.weights = None  # the copy's model may be a copy too
        model = self.owner() if self.owner is not None else None
        new.owner = weakref.ref(memo.get(id(model), model)) if model is not None else None
        return new

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions written so far, pads included (transformers' `Cache.get_seq_length`, which PEFT's prompt
        tuning asks of the cache while generating)."""
        return self.seqlen

    def fits(self, config: MixConConfig) -> bool:
        """Whether this cache has the layers, in order, and the per-row shapes that `config`'s model uses."""
        if config is self.config:  # made for it (`new_cache`): checked on every decoding step, so no layer walk
            return True
        layout = config.layout()
        if len(layout) != len(self.layers):
            return False
        B = self.batch_size
        for (mixer, _), layer in zip(layout, self.layers, strict=True):
            if isinstance(layer, AttentionCache):
                if mixer != "attention" or layer.k.shape != attention_cache_shape(config, B, layer.k.shape[2]):
                    return False
            elif mixer != "conba" or layer.conv.shape != conba_conv_shape(config, B) or (
                    (len(layer.slots), *layer.state.shape) != conba_states_shape(config, B)):
                return False
        return True

    def reserve(self, length: int) -> None:
        """Make room for `length` positions in every attention layer (no-op when there is room): double the
        capacity, but not past `limit` while `length` is within it, so that a generation's cache ends at the size
        that `cache_nbytes` gives for its whole length (a cache continued past it doubles again)."""
        capacity = self.key_mask.shape[1]
        if length <= capacity:
            return
        within = self.limit is not None and length <= self.limit
        new = max(length, min(2 * capacity, self.limit) if within else 2 * capacity)
        self.key_mask = torch.nn.functional.pad(self.key_mask, [0, new - capacity])
        for layer in self.layers:
            if isinstance(layer, AttentionCache):
                layer.grow(new)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (B',), in that order: e.g. drop finished sequences, reorder beams.
        A cache decoded from CUDA graphs (`capture_decode`) that keeps its batch size is reordered in place, so
        that its tensors, and with them its graphs, stay (beam search reorders every step)."""
        self._select_rows(index, in_place=self.weights is not None and index.shape[0] == self.batch_size)

    def _select_rows(self, index: torch.Tensor, in_place: bool) -> None:
        for layer in self.layers:
            layer.select_rows(index, in_place)
        self.key_mask = _rows(self.key_mask, index, in_place)
        self.positions = _rows(self.positions, index, in_place)

    def detach_(self) -> MixConCache:
        """Cut the autograd history of what the cache holds (truncated backpropagation through time: the next
        forward through it starts a new graph, as `hidden.detach()` does for an RNN); returns the cache."""
        for layer in self.layers:
            layer.detach_()
        return self

    def branch(self, index: torch.Tensor) -> MixConCache:
        """A new cache holding the rows in `index` (B',), repeats allowed, of this one, which is left as it
        is: e.g. one prefilled prompt continued several ways."""
        new = copy.copy(self)
        new.layers = [copy.copy(layer) for layer in self.layers]
        new._select_rows(index, in_place=False)  # new tensors everywhere: the two share none
        return new

    def layer_nbytes(self) -> list[int]:
        return [layer.nbytes() for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes held by the per-layer tensors (K/V, conv tails, states)."""
        return sum(self.layer_nbytes())
