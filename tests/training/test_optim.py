import itertools
import math

import pytest
import torch

from mixcon import MixConConfig, MixConForCausalLM
from mixcon.training.optim import build_optimizer, lr_at, param_groups


def test_weight_decay_on_matrices_only():
    model = MixConForCausalLM(MixConConfig.preset("tiny"))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    for suffix in ("A_log", "dt_bias", "mixer.D", "mixer_norm.weight", "ffn_norm.weight", "conv1d.bias", "rho_bias"):
        assert any(n.endswith(suffix) for n in plain), suffix
        assert not any(n.endswith(suffix) for n in decayed), suffix
    for suffix in ("in_proj.weight", "out_proj.weight", "w_gate_up", "router.weight", "embed.weight"):
        assert any(n.endswith(suffix) for n in decayed), suffix
    # every parameter exactly once, the tied embedding / LM head included
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_optimizer_is_adamw_with_both_groups():
    model = MixConForCausalLM(MixConConfig.preset("tiny"))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert (opt.defaults["betas"], opt.defaults["eps"]) == ((0.9, 0.95), 1e-8)  # GPT-3 / Llama
    assert opt.defaults["fused"]  # on a CPU too: ~3.5x faster than the foreach form for `small` on 2 threads


def test_fused_steps_match_the_foreach_form():
    """The fused kernel takes the same steps as torch's foreach AdamW (to rounding), weight decay per group."""
    torch.manual_seed(0)
    model = MixConForCausalLM(MixConConfig.preset("tiny"))
    twin = MixConForCausalLM(MixConConfig.preset("tiny"))
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(param_groups(twin, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    for _ in range(3):
        for m in (model, twin):
            for p in m.parameters():
                p.grad = torch.sin(p.detach() * 7 + 1)  # the same gradient for both
        opt.step()
        ref.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_frozen_parameters_are_left_out_of_the_optimizer():
    """Parameters with requires_grad=False (a frozen embedding, PEFT's base model) are in neither group."""
    model = MixConForCausalLM(MixConConfig.preset("tiny"))
    model.embed.weight.requires_grad_(False)  # tied: the LM head's weight too
    model.norm.weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.1)
    kept = {id(p) for g in groups for p in g["params"]}
    assert id(model.embed.weight) not in kept and id(model.norm.weight) not in kept
    assert len(kept) == len([p for p in model.parameters() if p.requires_grad]) > 0


def test_schedule_warmup_then_cosine():
    kw = dict(peak=1.0, warmup=10, total=111, min_ratio=0.1)  # steps 0 .. 110
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == 0.1  # the last step trained ends the decay, as --min-lr-ratio says
    assert lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_a_run_shorter_than_its_warmup_reaches_the_peak_and_ends_at_the_minimum():
    """The warmup fits in the run: all but its last step (a 10-step run with 20 warmup steps ended at half the
    peak and never decayed, against --min-lr-ratio's "final learning rate")."""
    for warmup in (9, 20):
        values = [lr_at(s, peak=1.0, warmup=warmup, total=10, min_ratio=0.1) for s in range(12)]
        assert values == pytest.approx([(s + 1) / 9 for s in range(9)] + [0.1] * 3)
    assert lr_at(0, peak=1.0, warmup=5, total=1, min_ratio=0.1) == 0.1  # a single step is the last one


def test_schedule_without_total_holds_peak_after_warmup():
    assert lr_at(5, peak=2.0, warmup=10, total=None, min_ratio=0.1) == pytest.approx(1.2)
    assert lr_at(1000, peak=2.0, warmup=10, total=None, min_ratio=0.1) == 2.0
    assert lr_at(0, peak=2.0, warmup=0, total=100, min_ratio=0.0) == 2.0
