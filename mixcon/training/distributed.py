"""Parallelism on PyTorch's own engines: torchrun process groups, DDP or FSDP2 (`fully_shard` per MixCon
layer), activation checkpointing, torch.compile, and full (unsharded) state dicts for checkpoints, so that a
checkpoint loads at any world size. The model code itself stays single-device."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

Parallelism = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(device: str | None = None) -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group: NCCL on CUDA,
    gloo on CPU. Without torchrun, a single process on `device` (default: CUDA when available)."""
    kind = torch.device(device or default_device()).type
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistEnv(device=torch.device(device or default_device()))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA device(s): "
                             "start at most that many processes per node, or pass --device cpu (gloo)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(kind)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: Literal["sum", "max"] = "sum") -> torch.Tensor:
    """In-place all-reduce over all ranks (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (on every rank)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def parallelize(
    model: nn.Module,
    env: DistEnv,
    *,
    mode: Parallelism = "ddp",
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Apply activation checkpointing and torch.compile per layer of `model.layers`, move the model to the
    device, then wrap it in DDP or shard it with FSDP2 when there is more than one process. Returns the module
    to call in training: the DDP wrapper, or `model` itself (FSDP2 shards it in place). Parameter names are
    kept, so full state dicts are the same in every case."""
    if activation_checkpointing:
        checkpoint_layers(model)
    if compile:
        for layer in model.layers:
            layer.compile()
    if env.distributed and mode == "fsdp":  # each process moves only its shards to its device
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    model.to(env.device)
    if not env.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def checkpoint_layers(model: nn.Module, enable: bool = True, *, checkpoint_fn: Callable[..., Any] | None = None,
                      every_n_layers: int = 1) -> None:
    """Activation checkpointing of `model.layers`: the 1st, (1 + every_n_layers)-th, ... layer keeps only its
    inputs and is recomputed in the backward, through `checkpoint_fn(function, *inputs)` (default: torch's
    non-reentrant checkpoint), in training mode with gradients on; elsewhere (evaluation, decoding) layers run
    plainly. enable=False turns it off. No module is wrapped: module, parameter and state-dict names stay those
    of the plain model (PEFT finds its adapters by module names)."""
    if every_n_layers < 1:
        raise ValueError(f"every_n_layers={every_n_layers} must be >= 1")
    recompute = checkpoint_fn or partial(checkpoint, use_reentrant=False)
    for i, layer in enumerate(model.layers):
        layer.recompute = recompute if enable and i % every_n_layers == 0 else None


@contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for all but the last micro-batch of an accumulation."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
        yield
    else:
        with module.no_sync() if isinstance(module, DistributedDataParallel) and not enabled else nullcontext():
            yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (inf: measure only); returns the total norm before clipping as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Names of parameters that are another parameter (tied embeddings) -> the first name. Checkpoints store
    each tensor once, as `save_pretrained` does."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


_FULL_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FULL_LOAD = StateDictOptions(full_state_dict=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer,
               aliases: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded model and optimizer state on the CPU of rank 0 (empty on other ranks); a collective. Before the
    first step the optimizer's state is empty, and stays so (torch's get_state_dict fills an empty one by a
    step on zero gradients: AdamW's step 1, which a run resumed from it would count as taken)."""
    fresh = not optimizer.state
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_FULL_SAVE)
    if fresh:
        optimizer.state.clear()
        optimizer_state = {**optimizer_state, "state": {}}
    return {k: v for k, v in model_state.items() if k not in aliases}, optimizer_state


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], aliases: dict[str, str]) -> None:
    """Load unsharded states (as `full_state` returns them, read by every rank) into a model of any parallelism."""
    model_state = {**model_state, **{alias: model_state[name] for alias, name in aliases.items()}}
    if not optimizer_state.get("state"):  # saved before the first step: the optimizer stays fresh (torch's
        # set_state_dict would first fill its state by a step on zero gradients)
        set_model_state_dict(model, model_state, options=_FULL_LOAD)
        return
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=_FULL_LOAD)
