"""Next-real-token loss on text with uninformative tokens inserted (`mixcon.data.synthetic.insert_filler`)."""

from __future__ import annotations

import torch

from mixcon.data.synthetic import insert_filler
from mixcon.evaluation.perplexity import row_nll
from mixcon.models.mixcon import IGNORE, MixConForCausalLM


@torch.no_grad()
def filler_loss(model: MixConForCausalLM, windows: torch.Tensor, ratio: float, filler_id: int, *,
                batch_size: int = 32, seed: int = 0) -> float:
    """Mean negative log-likelihood (nats) of each next real token of `windows` (N, R), predicted at the
    real token before it, with round(ratio · R) fillers inserted per window at places drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    device = model.embed.weight.device
    total, count = 0.0, 0
    with model.evaluating():
        for start in range(0, windows.shape[0], batch_size):
            inputs, labels = insert_filler(windows[start:start + batch_size], ratio, filler_id, generator)
            total += float(row_nll(model(inputs.to(device)).logits, labels.to(device)).sum())
            count += int((labels != IGNORE).sum())
    return total / count
