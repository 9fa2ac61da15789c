"""Next-real-token loss on text with uninformative tokens inserted (`mixcon.data.synthetic.insert_filler`)."""

from __future__ import annotations

import torch

from mixcon.checks import is_integer
from mixcon.data.synthetic import insert_filler
from mixcon.evaluation.perplexity import row_scores
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.ops.cross_entropy import IGNORE


@torch.no_grad()
def filler_loss(model: MixConForCausalLM, windows: torch.Tensor, ratio: float, filler_id: int, *,
                batch_size: int = 32, seed: int = 0) -> float:
    """Mean negative log-likelihood (nats) of each next real token of `windows` (N, R), predicted at the
    real token before it, with round(ratio · R) fillers inserted per window at places drawn from `seed` (the
    same for any `batch_size`: each row's draws follow the previous row's), `batch_size` windows at a time."""
    if not (is_integer(batch_size) and batch_size >= 1):
        raise ValueError(f"filler_loss: batch_size={batch_size!r} must be an integer >= 1")
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"filler_loss: windows must be (N, R) with N >= 1, got {tuple(windows.shape)}")
    generator = torch.Generator().manual_seed(seed)
    device = model.embed.weight.device
    total, count = 0.0, 0
    with model.evaluating():
        for start in range(0, windows.shape[0], batch_size):
            inputs, labels = insert_filler(windows[start:start + batch_size], ratio, filler_id, generator)
            hidden = model(inputs.to(device), return_logits=False).last_hidden_state
            total += float(row_scores(model, hidden, labels.to(device))[0].sum())
            count += int((labels != IGNORE).sum())
    return total / count
