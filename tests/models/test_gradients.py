"""The model's gradients are the derivatives of its loss: for each weight alone, autograd's gradient along a random
direction against a central finite difference of the loss, in fp64, through every mechanism at once (Conba with
control, delay and state scaling, or in Mamba-2's SSD mode; attention with RoPE, MoE with its router losses, the
fused LM-head loss), with left padding, pads between tokens or packed documents. Any backward pass of our own that
is wrong, or a tensor detached on the way, moves one of these by O(1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixcon import MixConForCausalLM
from mixcon.ops.cross_entropy import IGNORE

EPS = 1e-6  # central differences in fp64: truncation O(EPS²), rounding O(1e-16 / EPS)


def loss_of(model: MixConForCausalLM, ids: torch.Tensor, extra: dict) -> torch.Tensor:
    labels = F.pad(ids[:, 1:], (0, 1), value=IGNORE)  # each token predicts the next (the model's labels are shifted)
    return model(ids, labels=labels, return_logits=False, **extra).loss


SSD = dict(conba_selective="linear", conba_state_scaling=False, conba_control=False, conba_delay=0)  # Mamba-2's


@pytest.mark.parametrize("layers,inputs", [("every switch", "left-padded"), ("every switch", "gapped"),
                                           ("every switch", "packed"), ("ssd", "plain")])
def test_each_weights_gradient_is_the_finite_difference_of_the_loss(layers, inputs, tiny_model):
    model = tiny_model(attn_rope=True, router_z_loss_coef=0.01, tie_embeddings=False,
                       **(SSD if layers == "ssd" else {})).train()
    with torch.no_grad():  # away from initial values that hide terms (zero gains and biases, unit norms)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=gen)
    extra = {}
    if inputs in ("left-padded", "gapped"):  # gapped: pads between tokens, moved first and the outputs back
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        extra["attention_mask"] = mask if inputs == "left-padded" else mask.roll(3, 1)  # pads score nothing
    elif inputs == "packed":
        extra["seq_idx"] = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3])
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss_of(model, ids, extra), list(params.values())),
                     strict=True))
    for name, p in params.items():
        v = torch.randn(p.shape, dtype=p.dtype, generator=gen)
        with torch.no_grad():
            saved = p.clone()
            p.add_(EPS * v)
            up = loss_of(model, ids, extra)
            p.copy_(saved - EPS * v)
            down = loss_of(model, ids, extra)
            p.copy_(saved)
        numeric, analytic = float((up - down) / (2 * EPS)), float((grads[name] * v).sum())
        assert abs(numeric) > 1e-6, name  # the weight reaches the loss
        # measured: at most 1/7 of this bound apart; 10 % of the smallest gradient (1e-5) is 100 times the bound
        assert abs(numeric - analytic) <= 1e-6 * abs(numeric) + 1e-8, (name, numeric, analytic)
