"""AdamW with weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices (ndim >= 2: linear, embedding, expert weights) decay; vectors do not
    (norm weights, biases, A_log, dt_bias, D and every other 1-D parameter). Tied weights appear once."""
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicates shared (tied) parameters
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """torch AdamW over `param_groups`; its fused kernel where every parameter is on the CPU or every one on CUDA
    (a step over `small`'s 44M parameters on 2 CPU threads: 33 ms fused, 118 ms in torch's default foreach form;
    docs/benchmarks.md §39)."""
    devices = {p.device.type for p in model.parameters()}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused or None)


def warmup_steps(warmup: int, total: int | None) -> int:
    """The warmup a run of `total` steps takes: at most its first total - 1 (None: not yet known, all of it)."""
    return warmup if total is None else min(warmup, max(total - 1, 0))


def lr_at(step: int, *, peak: float, warmup: int, total: int | None, min_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup over `warmup` steps to `peak`, then a
    cosine decay to `min_ratio * peak` at the last step of `total` (step total - 1), constant after. `total=None`
    (not yet known) holds `peak`. A run of `total` steps warms up over at most its first total - 1 (a shorter run
    than its warmup still reaches the peak and ends at the minimum)."""
    warmup = warmup_steps(warmup, total)
    if step < warmup:
        return peak * (step + 1) / warmup
    if total is None:
        return peak
    if step >= total - 1:
        return peak * min_ratio
    progress = (step - warmup) / (total - 1 - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
