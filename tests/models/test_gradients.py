"""The model's gradients are the derivatives of its loss: for each weight alone, autograd's gradient along a random
direction against a central finite difference of the loss, in fp64, through every mechanism at once (Conba with
control, delay and state scaling, attention with RoPE, MoE with its router losses, the fused LM-head loss), with
left padding or packed documents. Any backward pass of our own that is wrong, or a tensor detached on the way,
moves one of these by O(1)."""

from __future__ import annotations

import pytest
import torch

EPS = 1e-6  # central differences in fp64: truncation O(EPS²), rounding O(1e-16 / EPS)


def loss_of(model, ids: torch.Tensor, labels: torch.Tensor, extra: dict) -> torch.Tensor:
    return model(ids, labels=labels, return_logits=False, **extra).loss


@pytest.mark.parametrize("inputs", ["left-padded", "packed"])
def test_each_weights_gradient_is_the_finite_difference_of_the_loss(inputs, tiny_model):
    model = tiny_model(attn_rope=True, router_z_loss_coef=0.01, tie_embeddings=False).train()
    with torch.no_grad():  # away from initial values that hide terms (zero gains and biases, unit norms)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=gen)
    labels = ids.clone()
    if inputs == "left-padded":
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        labels[mask == 0] = -100
        extra = {"attention_mask": mask}
    else:
        extra = {"seq_idx": torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3])}
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss_of(model, ids, labels, extra), list(params.values())),
                     strict=True))
    for name, p in params.items():
        v = torch.randn(p.shape, dtype=p.dtype, generator=gen)
        with torch.no_grad():
            p.add_(EPS * v)
            up = loss_of(model, ids, labels, extra)
            p.sub_(2 * EPS * v)
            down = loss_of(model, ids, labels, extra)
            p.add_(EPS * v)
        numeric, analytic = float((up - down) / (2 * EPS)), float((grads[name] * v).sum())
        assert abs(numeric) > 1e-6, name  # the weight reaches the loss
        # measured: <= 2.5e-8 apart, 1e-9 for the smallest (1e-5); a gradient 10 % off is 1e-6 apart or more
        assert abs(numeric - analytic) <= 1e-6 * abs(numeric) + 1e-8, (name, numeric, analytic)
