"""Recall accuracy on multi-query associative recall (MQAR, `mixcon.data.synthetic.RecallTask`)."""

from __future__ import annotations

import torch

from mixcon.checks import is_integer
from mixcon.data.synthetic import RecallTask
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.ops.cross_entropy import IGNORE


@torch.no_grad()
def recall_accuracy(model: MixConForCausalLM, task: RecallTask, num_pairs: int, *, sequences: int = 256,
                    batch_size: int = 64, seed: int = 0) -> float:
    """Fraction of queried keys whose value is the model's most likely next token, over `sequences`
    held-out sequences with `num_pairs` pairs each, all drawn from `seed` (the same for any `batch_size`), run
    `batch_size` at a time."""
    for name, value in (("sequences", sequences), ("batch_size", batch_size)):
        if not (is_integer(value) and value >= 1):
            raise ValueError(f"recall_accuracy: {name}={value!r} must be an integer >= 1")
    if model.config.vocab_size < task.vocab_size:
        raise ValueError(f"recall_accuracy: the model's vocab_size={model.config.vocab_size} is smaller than "
                         f"the task's {task.vocab_size}")
    all_ids, all_labels = task.sample(sequences, num_pairs, torch.Generator().manual_seed(seed))  # (S, T)
    device = model.embed.weight.device
    hits = total = 0
    with model.evaluating():
        for start in range(0, sequences, batch_size):
            ids = all_ids[start:start + batch_size].to(device)  # (B, T)
            labels = all_labels[start:start + batch_size].to(device)
            scored = labels != IGNORE  # (B, T)
            predicted = model(ids).logits.argmax(-1)  # (B, T)
            hits += int((predicted[scored] == labels[scored]).sum())
            total += int(scored.sum())
    return hits / total
