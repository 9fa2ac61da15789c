"""Decoding steps replayed from CUDA graphs: the hundreds of kernel launches of one step become one
replay (decoding a small model on a GPU is bound by launches, not by the GPU; docs/benchmarks.md §15)."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import torch

Step = Callable[..., torch.Tensor]  # `MixConForCausalLM.decode_step` (or its compiled form)


class _Graph(NamedTuple):
    input_ids: torch.Tensor  # (B, 1): where a replay reads the new tokens
    index: torch.Tensor  # (1,): and their cache position
    replay: Callable[[], torch.Tensor]  # runs the captured step; returns its logits (B, 1, V), overwritten by the next


def _layout(t: torch.Tensor) -> tuple[Hashable, ...]:
    return t.data_ptr(), t.shape, t.stride(), t.dtype


def weight_pointers(module: torch.nn.Module) -> tuple[int, ...]:
    """Where `module`'s parameters are (what its graphs read; a walk 4x faster than `parameters()`'s)."""
    out = [p.data_ptr() for p in module._parameters.values() if p is not None]
    for child in module._modules.values():
        if child is not None:
            out += weight_pointers(child)
    return tuple(out)


class DecodeGraphs:
    """CUDA graphs of a decoding step, one per set of tensors it reads and writes in place: the cache's (a new
    cache, one grown or with rows dropped, each phase of a Conba ring of tau > 1 states) and the weights.

    The first step on such tensors runs as it is (on the side stream that captures, so that libraries' handles
    for it exist before a capture), then is captured; later steps copy their tokens and cache position into the
    graph's inputs and replay it. The `max_graphs` most recently used graphs are kept. Steps that `applies`
    refuses (not on CUDA, or under autocast, whose cast cache a graph would freeze) run as they are; so do all
    steps after a capture failed (with a warning that says why).
    """

    device_type = "cuda"  # where steps are captured

    def __init__(self, max_graphs: int = 16) -> None:
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self.replays = 0
        self.failed: str | None = None  # why a capture failed
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, tuple[int, int]]] = {}

    def applies(self, input_ids: torch.Tensor) -> bool:
        """Whether a step on `input_ids` is replayed from a graph."""
        return self.failed is None and self._capturable(input_ids)

    def _capturable(self, input_ids: torch.Tensor) -> bool:
        return input_ids.device.type == self.device_type and not torch.is_autocast_enabled(self.device_type)

    def clear(self) -> None:
        """Drop every graph (their step function changed)."""
        self.graphs.clear()

    def __call__(self, step: Step, input_ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                 index: torch.Tensor, caches: Sequence[tuple[torch.Tensor, ...]], weights: Hashable) -> torch.Tensor:
        """`step(input_ids, positions, key_mask, index, caches)`, from a graph when one was captured on the same
        tensors; `weights`: the model's `weight_pointers` (replaced weights need new graphs)."""
        # The cache tensors' shapes, strides and dtype follow from the key mask's (B, capacity) and the weights'
        # dtype (contiguous tensors of the config's shapes): their addresses tell them apart.
        key = (_layout(positions), _layout(key_mask), *(t.data_ptr() for tensors in caches for t in tensors), weights)
        graph = self.graphs.get(key)
        if graph is None:
            device = input_ids.device
            logits = self._warm_up(lambda: step(input_ids, positions, key_mask, index, caches), device)
            with torch.inference_mode(False):  # ordinary tensors: replays under no_grad write them too
                ids, idx = input_ids.clone(), index.clone()
            try:
                replay = self._capture(lambda: step(ids, positions, key_mask, idx, caches), device)
            except RuntimeError as e:  # the step just ran: its result stands, and the next steps run so too
                self.failed = f"{type(e).__name__}: {e}"
                warnings.warn(f"capture_decode: a decoding step could not be captured in a CUDA graph ({self.failed}); "
                              "decoding goes on without graphs", RuntimeWarning, stacklevel=2)
                return logits
            self.graphs[key] = _Graph(ids, idx, replay)
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
            return logits
        self.graphs.move_to_end(key)
        graph.input_ids.copy_(input_ids)
        graph.index.copy_(index)
        self.replays += 1
        return graph.replay().clone()  # the next replay, of any graph (they share memory), overwrites it

    def _stream(self, device: torch.device) -> tuple[torch.cuda.Stream, tuple[int, int]]:
        """The side stream that warms up and captures on `device`, and the memory pool its graphs share."""
        if device not in self._streams:
            with torch.cuda.device(device):
                self._streams[device] = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
        return self._streams[device]

    def _warm_up(self, run: Step, device: torch.device) -> torch.Tensor:
        """`run()` on the side stream, in order with the current stream's work before and after it."""
        stream, _ = self._stream(device)
        with torch.cuda.device(device):
            current = torch.cuda.current_stream()
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                logits = run()
            current.wait_stream(stream)
        logits.record_stream(current)
        return logits

    def _capture(self, run: Step, device: torch.device) -> Callable[[], torch.Tensor]:
        """A graph of `run()` (captured, not run); returns what replays it."""
        stream, pool = self._stream(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=pool, stream=stream,
                                                         capture_error_mode="thread_local"):
            logits = run()

        def replay() -> torch.Tensor:
            with torch.cuda.device(device):
                graph.replay()
            return logits

        return replay
