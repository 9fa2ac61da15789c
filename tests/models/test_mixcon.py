"""The assembled model: causality, cached decoding == full forward, gradients, save/load, sizes, errors (the cache
itself: tests/generation/test_cache.py)."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re

import pytest
import torch
import torch.nn.functional as F

from mixcon import MixConCache, MixConConfig, MixConForCausalLM
from mixcon.models.mixcon import IGNORE

LAYOUTS = {
    "mixcon": {},
    "transformer": dict(attn_per_block=4),
    "conba": dict(attn_per_block=0),
    "jamba": dict(layers_per_block=8, n_blocks=1, attn_per_block=1),
    "dense": dict(moe_every=0),
    "rope": dict(attn_rope=True),
    "ssd-linear": dict(conba_selective="linear", conba_state_scaling=False, conba_control=False, conba_delay=0),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_forward_equals_prefill_then_decode(layout, tiny_model):
    model = tiny_model(**LAYOUTS[layout])
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, max_length=4)  # grows as needed
        pieces = [model(ids[:, :13], cache=cache).logits]
        pieces.append(model(ids[:, 13:17], cache=cache).logits)  # a chunked continuation
        pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(17, 23)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-9, atol=1e-9)


def test_left_padded_cached_forward_then_decode_equals_each_row_alone(tiny_model):
    """With RoPE, a left-padded prefill advances each row's position by its real tokens only: the next tokens
    (decoded, then a chunk) are rotated as in the row's own cache."""
    model = tiny_model(attn_rope=True)
    prompts = [torch.randint(3, 300, (10,)), torch.randint(3, 300, (4,))]
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 10 - len(p):], mask[i, 10 - len(p):] = p, 1
    more = torch.randint(3, 300, (2, 3))
    with torch.no_grad():
        cache = model.new_cache(2)
        model(ids, attention_mask=mask, cache=cache)
        assert torch.equal(cache.positions, mask.sum(1))
        got = torch.cat([model(more[:, :1], cache=cache).logits, model(more[:, 1:], cache=cache).logits], 1)
        for i, p in enumerate(prompts):
            alone = model.new_cache(1)
            model(p[None], cache=alone)
            want = torch.cat([model(more[i:i + 1, :1], cache=alone).logits,
                              model(more[i:i + 1, 1:], cache=alone).logits], 1)
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tau", [2, 3])  # (a ring of 2 states reads the same reversed: 3 tells the order)
@pytest.mark.parametrize("decoded", [1, 3])  # an odd number of steps leaves the Conba ring's pointer mid-ring
def test_a_chunk_after_decoding_steps_equals_the_full_forward(decoded, tau, tiny_model):
    """Prefill, single-token decoding steps (the ring of delayed states turns), then a multi-token chunk and more
    steps: the chunk reads the delayed states in their order."""
    model = tiny_model(conba_delay=tau)
    ids = torch.randint(0, model.config.vocab_size, (2, 5 + decoded + 6))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        pieces = [model(ids[:, :5], cache=cache).logits]
        pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(5, 5 + decoded)]
        pieces.append(model(ids[:, 5 + decoded:9 + decoded], cache=cache).logits)
        pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(9 + decoded, 11 + decoded)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-9, atol=1e-9)


def test_forward_hooks_on_layers_and_mixers_fire_at_every_decoding_step(tiny_model):
    """The decoding step calls each layer's and mixer's `decode` directly: with hooks there (steering, probes), a
    step takes the general path, so that generate equals greedy decoding by full forwards under the same hooks."""
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    calls = []

    def steer(module, args, out):
        calls.append(module)
        return out + 0.5 if isinstance(out, torch.Tensor) else (out[0] + 0.5, *out[1:])

    model.layers[1].mixer.register_forward_hook(steer)
    handle = model.layers[2].register_forward_hook(steer)
    tokens = model.generate(ids, max_new_tokens=5)
    assert len(calls) == 2 * 5  # prompt and 4 steps (the last token is not fed back), twice
    with torch.no_grad():
        expected = ids
        for _ in range(5):
            expected = torch.cat([expected, model(expected).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(tokens, expected)
    handle.remove()
    assert model._hooked()  # the mixer's hook alone
    model.layers[1].mixer._forward_hooks.clear()
    assert not model._hooked()
    handle = model.layers[3].mixer.register_forward_pre_hook(lambda *_: None)
    assert model._hooked()
    handle.remove()
    assert not model._hooked()


def test_a_global_forward_hook_makes_decoding_take_the_general_path(tiny_model):
    """`nn.modules.module.register_module_forward_hook` fires on every module: a decoding step that called the
    layers' `decode` directly would skip it, so each step runs the layers' forward (and the hook)."""
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, _i, _o: calls.append(m) if m is model.layers[0] else None)
    try:
        model.generate(ids, max_new_tokens=4)
    finally:
        handle.remove()
    assert len(calls) == 4  # the prompt and 3 steps
    assert not model._hooked()


@pytest.mark.parametrize("layout", ["mixcon", "conba", "transformer"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradients_through_cached_forwards_equal_those_of_the_full_forward(layout, training, tiny_model):
    """A prefill, a chunk and single tokens through one cache, then one backward over all of them: the cache's
    updates make new tensors under autograd, so earlier calls' saved tensors stay intact."""
    model = tiny_model(**LAYOUTS[layout], router_aux_loss_coef=0.0).train(training)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    weights = torch.randn(2, 12, model.config.vocab_size, dtype=torch.float64)

    def grads(logits: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        (logits * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    torch.manual_seed(1)  # the same noise draws (Conba's training noise) in both
    full = grads(model(ids).logits)
    torch.manual_seed(1)
    cache = model.new_cache(2, max_length=4)  # grows as needed
    pieces = [model(ids[:, :7], cache=cache).logits, model(ids[:, 7:9], cache=cache).logits]
    pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(9, 12)]
    cached = grads(torch.cat(pieces, 1))
    assert len(cached) == len(full) > 0
    for a, b in zip(cached, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def next_token_loss(model: MixConForCausalLM, ids: torch.Tensor, extra: dict) -> torch.Tensor:
    labels = F.pad(ids[:, 1:], (0, 1), value=IGNORE)  # each token predicts the next (the model's labels are shifted)
    return model(ids, labels=labels, return_logits=False, **extra).loss


@pytest.mark.parametrize("layout,inputs", [("mixcon", "left-padded"), ("mixcon", "gapped"), ("mixcon", "packed"),
                                           ("ssd-linear", "plain")])
def test_each_weights_gradient_is_the_finite_difference_of_the_loss(layout, inputs, tiny_model):
    """For each weight alone, autograd's gradient of the loss along a random direction against a central finite
    difference, in fp64, through every mechanism at once (Conba with control, delay and state scaling, or in
    Mamba-2's SSD mode; attention with RoPE, MoE with its router losses, the fused LM-head loss), with left padding,
    pads between tokens or packed documents. Any backward pass of our own that is wrong, or a tensor detached on
    the way, moves one of these by O(1)."""
    eps = 1e-6  # truncation O(eps²), rounding O(1e-16 / eps)
    model = tiny_model(attn_rope=True, router_z_loss_coef=0.01, tie_embeddings=False, **LAYOUTS[layout]).train()
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
    grads = dict(zip(params, torch.autograd.grad(next_token_loss(model, ids, extra), list(params.values())),
                     strict=True))
    for name, p in params.items():
        v = torch.randn(p.shape, dtype=p.dtype, generator=gen)
        with torch.no_grad():
            saved = p.clone()
            p.add_(eps * v)
            up = next_token_loss(model, ids, extra)
            p.copy_(saved - eps * v)
            down = next_token_loss(model, ids, extra)
            p.copy_(saved)
        numeric, analytic = float((up - down) / (2 * eps)), float((grads[name] * v).sum())
        assert abs(numeric) > 1e-6, name  # the weight reaches the loss
        # measured: at most 1/7 of this bound apart; 10 % of the smallest gradient (1e-5) is 100 times the bound
        assert abs(numeric - analytic) <= 1e-6 * abs(numeric) + 1e-8, (name, numeric, analytic)


def test_pads_leave_as_zeros_and_pass_no_gradient_to_the_weights(tiny_model):
    """Under autograd, pad positions' outputs are zeros: a loss that touches them (one on the logits that forgets
    the mask, a regulariser on hidden states) gives the weights the gradients of the real positions alone."""
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[1, 7:] = 0, 0  # left and right padding
    weights = torch.randn(2, 10, 300, dtype=torch.float64)
    grads = []
    for keep in (torch.ones_like(mask), mask):
        logits = model(ids, attention_mask=mask).logits
        assert torch.equal(logits[mask == 0], torch.zeros_like(logits[mask == 0]))
        grads.append(torch.autograd.grad((logits * weights * keep[..., None]).sum(), model.embed.weight)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_one_token_forwards_outside_the_decoding_step_mask_the_cache_pads(tiny_model):
    """With autograd on (or in training mode), a one-token forward through a cache takes the layers' forward, not
    the decoding step: a left-padded row's next token attends its real keys only, as the row alone does."""
    model = tiny_model()
    a, b, nxt = torch.randint(3, 300, (1, 5)), torch.randint(3, 300, (1, 3)), torch.randint(3, 300, (2, 1))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    cache = model.new_cache(2, max_length=16)
    model(ids, attention_mask=torch.tensor([[1] * 5, [0, 0, 1, 1, 1]]), cache=cache)
    got = model(nxt, cache=cache).logits[1, -1]
    torch.testing.assert_close(got, model(torch.cat([b, nxt[1:]], 1)).logits[0, -1], rtol=1e-9, atol=1e-9)


def test_one_token_forwards_through_a_cache_give_the_loss_and_router_logits(tiny_model):
    """A one-token forward through a cache with labels, or asking for the router logits, gives them as the
    full forward does at that position (it takes the layers' forward, not the decoding step, which has none)."""
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 7))
    labels = torch.full_like(ids, -100)
    labels[:, -1] = torch.tensor([4, 9])
    with torch.no_grad():
        full = model(ids, labels=labels, output_router_logits=True)
        caches = [model.new_cache(2), model.new_cache(2)]
        for cache in caches:
            model(ids[:, :-1], cache=cache)
        scored = model(ids[:, -1:], cache=caches[0], labels=labels[:, -1:])
        routed = model(ids[:, -1:], cache=caches[1], output_router_logits=True)
    torch.testing.assert_close(scored.lm_loss, full.lm_loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(scored.logits, full.logits[:, -1:], rtol=1e-9, atol=1e-9)
    assert routed.router_logits is not None and len(routed.router_logits) == len(full.router_logits)
    for step, whole in zip(routed.router_logits, full.router_logits, strict=True):
        torch.testing.assert_close(step, whole.view(2, 7, -1)[:, -1], rtol=1e-9, atol=1e-9)


def test_a_left_padded_prompt_fed_one_column_at_a_time_equals_its_prefill(tiny_model):
    """Feeding a left-padded batch through a cache one column at a time, each with its column of the mask, gives
    the logits of one prefill: a pad column of a row that has no token yet stays a pad (it takes no place in the
    cache, the positions or the Conba state), though its forward is one token per row."""
    model = tiny_model(attn_rope=True)
    ids = torch.randint(3, 300, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        cache = model.new_cache(2)
        got = torch.cat([model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache).logits
                         for t in range(6)], 1)
    assert torch.equal(cache.positions, mask.sum(1))
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-9, atol=1e-9)


def test_inputs_embeds_with_pads_anywhere_equal_the_input_ids(tiny_model):
    """inputs_embeds under a mask with pads between and after a row's tokens (PEFT's virtual tokens, then right
    padding) run as the input_ids' embeddings under that mask do: each row's real tokens as one sequence."""
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 2:4] = 0  # a gap
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = model(inputs_embeds=model.embed(ids), attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-12, atol=1e-12)


def test_copies_of_a_model_keep_its_compiled_prefill(tiny_model):
    """copy.deepcopy and pickle after `compile_prefill` (before anything was compiled): the copy's Conba layers
    run through a compiled prefill of their own, with the same segment and chunk."""
    model = tiny_model(dtype=torch.float32)
    model.compile_prefill(segment=6, chunk=3)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        prefills = [layer.mixer.prefill for layer in copied.layers if layer.mixer_kind == "conba"]
        assert prefills and all(p is not None and (p.segment, p.chunk) == (6, 3) for p in prefills)


def test_evaluating_restores_the_mode_the_model_had(tiny_model):
    model = tiny_model()
    for mode in (True, False):
        model.train(mode)
        with model.evaluating():
            assert not model.training and not model.layers[0].training
        assert model.training is mode and model.layers[0].training is mode
    model.train()
    with pytest.raises(RuntimeError, match="inside"), model.evaluating():
        raise RuntimeError("inside")
    assert model.training


def test_logits_to_keep_gives_the_last_positions(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(model(ids, logits_to_keep=3).logits, full[:, -3:], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(model(ids, logits_to_keep=0).logits, full)
        # transformers' other form: a 1-D tensor of the positions to keep (in a decoding step too)
        picked = model(ids, logits_to_keep=torch.tensor([0, 5, -1])).logits
        torch.testing.assert_close(picked, full[:, [0, 5, -1]], rtol=1e-9, atol=1e-9)
        ends = model(ids, logits_to_keep=torch.tensor([-9, 8])).logits  # the first and last positions: in range
        torch.testing.assert_close(ends, full[:, [0, 8]], rtol=1e-9, atol=1e-9)
        cache = model.new_cache(2)
        model(ids[:, :-1], cache=cache)
        step = model(ids[:, -1:], cache=cache, logits_to_keep=torch.tensor([0, 0])).logits
        torch.testing.assert_close(step, full[:, [-1, -1]], rtol=1e-9, atol=1e-9)
    for bad in (-1, 1.0, torch.tensor([0.0]), torch.tensor([[0]]), torch.tensor([9]), torch.tensor([-10]),
                torch.ones(9, dtype=torch.bool)):  # (a mask of positions is not their indices)
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(ids, logits_to_keep=bad)
    # With labels, all positions: the loss pairs each position's logits with its label (indices, even a
    # permutation of all of them, would pair them wrongly).
    for bad in (1, torch.arange(9).flip(0)):
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(ids, labels=ids, logits_to_keep=bad)


def test_hidden_states_are_the_embeddings_and_each_layers_output(tiny_model):
    """As transformers' models give them: n_layers + 1 states, the last after the final norm; through a cache
    too (the prefill's states, then the decoding step's)."""
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 7))
    outputs = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out[0])) for layer in model.layers]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    states = out.hidden_states
    assert len(states) == model.config.n_layers + 1
    torch.testing.assert_close(states[0], model.embed(ids))
    for state, layer_out in zip(states[1:-1], outputs[:-1], strict=True):
        torch.testing.assert_close(state, layer_out)
    torch.testing.assert_close(states[-1], model.norm(outputs[-1]))
    torch.testing.assert_close(model.lm_head(states[-1]), out.logits, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        cache = model.new_cache(2)
        model(ids[:, :6], cache=cache)
        step = model(ids[:, 6:], cache=cache, output_hidden_states=True).hidden_states
    for a, b in zip(step, states, strict=True):
        torch.testing.assert_close(a, b[:, 6:], rtol=1e-9, atol=1e-9)


def test_inputs_embeds_stand_in_for_the_embeddings(tiny_model):
    """Vectors given as inputs_embeds run as the embeddings of input_ids would, with labels and through a cache
    (a prefill of vectors, then token ids); exactly one of the two is given."""
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 7))
    labels = ids.roll(-1, 1)
    with torch.no_grad():
        embeds = model.embed(ids)
        want = model(ids, labels=labels)
        got = model(inputs_embeds=embeds, labels=labels)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
        cache = model.new_cache(2)
        first = model(inputs_embeds=embeds[:, :5], cache=cache).logits
        rest = [model(ids[:, t:t + 1], cache=cache).logits for t in (5, 6)]
        torch.testing.assert_close(torch.cat([first, *rest], 1), want.logits, rtol=1e-9, atol=1e-9)
    for kwargs, match in [(dict(), r"give input_ids .* or inputs_embeds"),
                          (dict(input_ids=ids, inputs_embeds=embeds), "one of them"),
                          (dict(inputs_embeds=embeds[..., :5]), r"inputs_embeds must be a floating tensor \(B, T, d"),
                          # the errors of shapes name the inputs given
                          (dict(inputs_embeds=embeds[:, :0]), r"inputs_embeds must hold at least one row"),
                          (dict(inputs_embeds=embeds, labels=labels[:, :3]), r"shape of inputs_embeds \(2, 7\)"),
                          (dict(inputs_embeds=embeds, attention_mask=labels[:, :3] > 0),
                           r"attention_mask must have the shape of inputs_embeds \(2, 7\)"),
                          (dict(inputs_embeds=embeds, cache=model.new_cache(1)), "inputs_embeds has B=2")]:
        with pytest.raises(ValueError, match=match):
            model(**kwargs)


def test_a_pads_label_is_not_scored(tiny_model):
    """A pad predicts nothing: a left-padded row's loss is the row's alone, whatever label its pads carry (a
    collator that masks only the pads' own labels leaves the last pad the first token's)."""
    model = tiny_model()
    ids = torch.randint(0, 300, (1, 10))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    mask = torch.ones_like(ids)
    mask[:, :4] = 0
    with torch.no_grad():
        alone = model(ids[:, 4:], labels=labels[:, 4:]).loss
        padded = model(ids, attention_mask=mask, labels=labels).loss  # pads labelled with the next ids
    torch.testing.assert_close(padded, alone, rtol=1e-12, atol=1e-12)


def test_forward_takes_only_the_input_ids_by_position(tiny_model):
    """Neither transformers' (input_ids, attention_mask) nor nanoGPT's (idx, targets) order is guessed at: a
    mask passed where labels were would be scored as targets."""
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 5))
    with pytest.raises(TypeError, match="positional"):
        model(ids, torch.ones_like(ids))


def test_fp32_decode_within_tolerance(tiny_model):
    model = tiny_model(dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(1)
        pieces = [model(ids[:, :20], cache=cache).logits]
        pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(20, 40)]
    inc = torch.cat(pieces, 1)
    assert float((inc - full).norm() / full.norm()) < 1e-4


@pytest.mark.parametrize("layout", ["mixcon", "transformer", "conba"])
def test_causality(layout, tiny_model):
    model = tiny_model(**LAYOUTS[layout])
    ids = torch.randint(0, 300, (1, 30))
    changed = ids.clone()
    changed[0, 17] = (ids[0, 17] + 1) % 300
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    # fp64 noise only (a batched matmul over other rows may round differently); a leak would be O(1)
    torch.testing.assert_close(a[:, :17], b[:, :17], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a[:, 17:], b[:, 17:])


def test_loss_and_aux_terms(tiny_model):
    model = tiny_model(dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 16))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    out = model(ids, labels=labels)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 300), labels[:, :-1].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ce)
    coef = model.config.router_aux_loss_coef
    torch.testing.assert_close(out.loss, out.lm_loss + coef * out.aux_loss)
    model.config.router_z_loss_coef = 0.1  # the z-loss's term counts too
    z_out = model(ids, labels=labels)
    assert z_out.z_loss.item() > 0
    torch.testing.assert_close(z_out.loss, z_out.lm_loss + coef * z_out.aux_loss + 0.1 * z_out.z_loss)
    n_moe = sum(f == "moe" for _, f in model.config.layout())
    assert out.expert_counts.shape == (n_moe, 4)
    # aux_loss and z_loss: the mean over the MoE layers of each layer's own term (not their sum)
    stats = []
    hooks = [layer.ffn.register_forward_hook(lambda _m, _i, output: stats.append(output[1]))
             for layer in model.layers if layer.ffn_kind == "moe"]
    with torch.no_grad():
        again = model(ids, labels=labels)
    for hook in hooks:
        hook.remove()
    assert len(stats) == n_moe > 1
    torch.testing.assert_close(again.aux_loss, torch.stack([s.aux_loss for s in stats]).mean())
    torch.testing.assert_close(again.z_loss, torch.stack([s.z_loss for s in stats]).mean())
    assert bool((out.expert_counts.sum(1) == 2 * 16 * model.config.top_k).all())
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "delay_gain" not in n)


def test_loss_without_logits_equals_loss_from_logits(tiny_model):
    """return_logits=False (the fused, chunked head + loss): same losses and the same gradients of every
    parameter, the tied embedding included."""
    model = tiny_model().train()
    ids = torch.randint(0, 300, (3, 20))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100

    def run(**kwargs):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels, **kwargs)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = run()
    got, got_grads = run(return_logits=False)
    assert got.logits is None
    for name in ("loss", "lm_loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    # Without labels: the final hidden states alone, whose head gives the logits (here, through a cache too).
    with torch.no_grad():
        full = model(ids).logits
        hidden = model(ids, return_logits=False, logits_to_keep=2).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), full[:, -2:], rtol=1e-12, atol=1e-12)
        cache = model.eval().new_cache(ids.shape[0])
        model(ids[:, :-1], cache=cache)
        last = model(ids[:, -1:], cache=cache, return_logits=False).last_hidden_state
        torch.testing.assert_close(model.lm_head(last), full[:, -1:], rtol=1e-10, atol=1e-10)


def test_save_load_identical_logits(tmp_path, tiny_model):
    for tied in (True, False):
        model = tiny_model(dtype=torch.float32, tie_embeddings=tied)
        model.save_pretrained(tmp_path / str(tied))
        loaded = MixConForCausalLM.from_pretrained(tmp_path / str(tied))
        assert not loaded.training  # as transformers': training mode (noise on) is asked for with .train()
        assert loaded.config == model.config
        assert (loaded.lm_head.weight is loaded.embed.weight) == tied
        ids = torch.randint(0, 300, (2, 9))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_model_built_on_the_meta_device_is_tied_again_after_to_empty(tiny_model):
    """to_empty gives the shared embedding and LM head separate storage; tie_weights shares them again (as
    transformers' does), and an untied config stays untied."""
    for tied in (True, False):
        with torch.device("meta"):
            model = MixConForCausalLM(MixConConfig.preset("tiny", tie_embeddings=tied))
        model.to_empty(device="cpu")
        assert model.lm_head.weight is not model.embed.weight
        model.tie_weights()
        assert (model.lm_head.weight is model.embed.weight) == tied


def test_an_untied_models_weights_under_a_tied_config_are_refused(tmp_path, tiny_model):
    """tie_embeddings edited to true over an untied model's weights: its own lm_head.weight was silently dropped."""
    tiny_model(dtype=torch.float32, tie_embeddings=False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_embeddings": True}))
    with pytest.raises(ValueError, match=r"its config says tie_embeddings=true, but its weights hold an lm_head.weight "
                                         r"other than embed.weight"):
        MixConForCausalLM.from_pretrained(tmp_path)


def test_model_directories_that_do_not_fit_together_are_refused_by_name(tmp_path, tiny_model):
    """Weights that do not fit the config, a broken shard index, both weight layouts at once: a ValueError naming
    the directory or file (the command line prints it in one line), not torch's RuntimeError or a KeyError."""
    tiny_model(dtype=torch.float32).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "layer_pattern": "ACCC"}))
    with pytest.raises(ValueError, match=rf"^{tmp_path}: its weights do not fit its config.json: .*Missing key"):
        MixConForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "conba_future_gate": True}))  # a newer version's
    with pytest.raises(ValueError, match=r"config.json: not a valid model config \(fields this version of mixcon does "
                                         r"not know: \['conba_future_gate'\]; .*\(upgrade mixcon to load it\)"):
        MixConForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mixcon"}))  # a wrapper's, without
    with pytest.raises(ValueError, match=r"config.json: not a valid model config"):  # its "mixcon" settings
        MixConForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))  # not ours at all
    with pytest.raises(ValueError, match=r"not a valid model config \(MixConConfig: unknown fields \['hidden_size', "
                                         r"'model_type'\]; known fields"):
        MixConForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"embed.weight": "model.safetensors"}}))
    with pytest.raises(ValueError, match=rf"^{tmp_path} holds both model.safetensors and model.safetensors.index.json"):
        MixConForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "shard.safetensors")
    for text in ('{"metadata": {}}', "{", '{"weight_map": [1]}'):
        index.write_text(text)
        with pytest.raises(ValueError, match=rf"^{index}: not a shard index"):
            MixConForCausalLM.from_pretrained(tmp_path)
    index.write_text('{"weight_map": {"embed.weight": 1, "norm.weight": 2}}')  # names, not paths
    with pytest.raises(ValueError, match=rf"^{index}: not a shard index \(TypeError: shard names must be strings"):
        MixConForCausalLM.from_pretrained(tmp_path)


def test_a_tied_model_whose_weights_lack_the_embedding_names_it_as_missing(tmp_path, tiny_model):
    """A tied model's file holds the shared tensor under embed.weight or lm_head.weight; with neither, the load
    names the missing key (the shared tensor is not made up)."""
    from safetensors.torch import load_file, save_file

    model = tiny_model(dtype=torch.float32)
    assert model.config.tie_embeddings
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = {k: v for k, v in load_file(path).items() if k not in ("embed.weight", "lm_head.weight")}
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"^{tmp_path}: its weights do not fit its config.json: .*Missing key.*"
                                         r"embed\.weight"):
        MixConForCausalLM.from_pretrained(tmp_path)


def test_load_keeps_the_saved_dtype_unless_told(tmp_path, tiny_model):
    model = tiny_model(dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = MixConForCausalLM.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    widened = MixConForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in widened.parameters()} == {torch.float32}
    for name, dtype in (("fp32", torch.float32), ("float32", torch.float32), ("torch.float16", torch.float16),
                        ("auto", torch.bfloat16)):  # names, as transformers' from_pretrained takes them
        assert MixConForCausalLM.from_pretrained(tmp_path, dtype=name).embed.weight.dtype == dtype
    for bad in ("int8", "cuda", "bf15", 3, "float8_e4m3fn", torch.int32, torch.float8_e5m2):  # (fp8: no norms)
        with pytest.raises(ValueError, match=rf"dtype={re.escape(repr(bad))}: expected one of torch.float32, "
                                             r"float64, bfloat16, float16, 'auto'"):
            MixConForCausalLM.from_pretrained(tmp_path, dtype=bad)
    for (name, a), b in zip(widened.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b.float()), name
    with torch.no_grad():  # weights of several dtypes (one layer kept in bf16): fp32, as when there is no saved one
        mixed = tiny_model(dtype=torch.float32)
        mixed.norm.weight.data = mixed.norm.weight.data.bfloat16()
    mixed.save_pretrained(tmp_path / "mixed")
    assert {p.dtype for p in MixConForCausalLM.from_pretrained(tmp_path / "mixed").parameters()} == {torch.float32}


def test_saved_files_get_the_permissions_of_the_umask(tmp_path, tiny_model):
    old = os.umask(0o027)
    try:
        tiny_model(dtype=torch.float32).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"model.safetensors": 0o640,
                                                                             "config.json": 0o640}


@pytest.mark.parametrize("expert_hidden", [None, 32])  # 32 = d_model: square w_down, whose shape shows nothing
def test_weights_saved_with_the_old_expert_layout_load_converted(tmp_path, tiny_model, expert_hidden):
    """Files without the layout mark hold the stacked experts (n, in, out), as mixcon saved them before: they
    load transposed, to identical logits; new files carry the mark."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = tiny_model(dtype=torch.float32, expert_hidden=expert_hidden)
    assert any(n.endswith(".w_gate_up") for n, _ in model.named_parameters())
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert f.metadata()["mixcon_expert_layout"] == "out_in"
    old = {k: v.transpose(-1, -2).contiguous() if k.endswith((".w_gate_up", ".w_down")) else v
           for k, v in load_file(str(weights)).items()}
    save_file(old, str(weights), metadata={"format": "pt"})
    loaded = MixConForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    if expert_hidden == model.config.d_model:  # unmarked square w_down: read as mixcon's own old files hold it
        return
    # A file without the mark in this layout (safetensors.torch.save_file of the state dict, another tool's): its
    # shapes show it, nothing is transposed.
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(weights))
    with torch.no_grad():
        torch.testing.assert_close(MixConForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits,
                                   rtol=0, atol=0)


def test_load_refuses_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a MixCon model directory"):
        MixConForCausalLM.from_pretrained(tmp_path)


def test_load_names_a_truncated_weights_file_or_a_bad_config(tmp_path, tiny_model):
    tiny_model().save_pretrained(tmp_path)
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    good = config.read_text()
    for text, reason in (("", "Expecting value"), ("[1, 2]", "a JSON object of config fields is expected, not list"),
                         (good.replace('"d_model": 32', '"d_model": 0'), r"MixConConfig\.d_model=0")):
        config.write_text(text)
        with pytest.raises(ValueError, match=rf"config\.json: not a valid model config \(.*{reason}"):
            MixConForCausalLM.from_pretrained(tmp_path)
    config.write_text(good)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        MixConForCausalLM.from_pretrained(tmp_path)


def test_out_of_vocabulary_ids_raise(tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"vocab_size=300"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[-1, 3]]))


def test_padding_anywhere_equals_the_row_alone(tiny_model):
    """Pads before, between and after a row's tokens leave its logits, hidden states and loss as the row's
    alone (the gap's pads take no place in the conv window nor the delay's τ steps)."""
    model = tiny_model()
    ids = torch.randint(0, 300, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.zeros(1, 17, dtype=torch.long)
    mask[:, 3:13] = 1
    with torch.no_grad():
        padded_out, alone = model(padded, attention_mask=mask), model(ids)
    torch.testing.assert_close(padded_out.logits[:, 3:13], alone.logits)
    # The pads count in no router statistic (transformers' load-balancing loss takes the mask too).
    assert torch.equal(padded_out.expert_counts, alone.expert_counts)
    torch.testing.assert_close(padded_out.aux_loss, alone.aux_loss)
    gap = torch.cat([padded[:, :7], torch.full((1, 2), 5), padded[:, 7:]], 1)  # two pads inside the tokens
    gap_mask = torch.cat([mask[:, :7], torch.zeros(1, 2, dtype=torch.long), mask[:, 7:]], 1)
    real = gap_mask[0].bool()
    labels = torch.randint(0, 300, gap.shape).masked_fill(~gap_mask.bool(), -100)
    with torch.no_grad():
        out = model(gap, attention_mask=gap_mask, labels=labels, output_hidden_states=True)
        want = model(ids, labels=labels[:, real], output_hidden_states=True)
    torch.testing.assert_close(out.logits[:, real], alone.logits)
    torch.testing.assert_close(out.lm_loss, want.lm_loss)
    for got, ref in zip(out.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(got[:, real], ref)
    with torch.no_grad():
        got, ref = (model(x, attention_mask=m, output_router_logits=True).router_logits
                    for x, m in ((gap, gap_mask), (ids, None)))
    for padded, row in zip(got, ref, strict=True):
        torch.testing.assert_close(padded[real], row)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pads_change_no_real_position(tiny_model, bad):
    """Whatever a pad's embedding (a soft prompt's unfilled rows, a pad id whose row diverged), the real
    positions' logits, the loss and generation are those of finite pads."""
    model = tiny_model(tie_embeddings=False)  # (tied, the pad's row would be a logit's weights too)
    ids = torch.randint(0, 290, (2, 9))  # (298: the pad id below)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    embeds = model.embed(ids).detach()
    poisoned = embeds.clone()
    poisoned[0, :4] = bad
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        want = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        got = model(inputs_embeds=poisoned, attention_mask=mask, labels=labels)
        torch.testing.assert_close(got.logits[mask.bool()], want.logits[mask.bool()])
        torch.testing.assert_close(got.loss, want.loss)
        alone = model.generate(ids[:1, 4:], 4)
        model.embed.weight[298] = bad
        padded = model.generate(ids[:1].masked_fill(mask[:1] == 0, 298), 4, attention_mask=mask[:1])
    assert torch.equal(padded[:, 4:], alone)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_labels_at_pads_are_not_scored(tiny_model, dtype):
    """Labels at pad positions (transformers' labels=input_ids) are not scored: loss and gradients are those of
    -100 there, finite in fp16. (They were once scored: their loss gradient passed the norms' slope at a zero row,
    1/sqrt(eps), layer after layer, inf in fp16, then nan in every weight; later a constant loss that diluted the
    real tokens' gradients by their share.)"""
    model = tiny_model(dtype).train()
    ids = torch.randint(0, 290, (2, 40))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    labels = ids.roll(-1, 1)

    def run(labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)  # (the same process noise, if any)
        model.zero_grad()
        loss = model(ids, labels=labels, attention_mask=mask).lm_loss
        (loss * 1024).backward()  # as fp16 needs a loss scale
        return loss.detach(), [p.grad.double() / 1024 for p in model.parameters() if p.grad is not None]

    (loss, every), (loss_real, real) = run(labels), run(labels.masked_fill(mask == 0, -100))
    assert all(g.isfinite().all() for g in every) and torch.equal(loss, loss_real)
    for g_every, g_real in zip(every, real, strict=True):
        assert torch.equal(g_every, g_real)


@pytest.mark.parametrize("pads", ["gap", "right"])
def test_a_new_cache_takes_pads_after_tokens_and_continues_the_real_ones(tiny_model, pads):
    """PEFT's prompt tuning puts virtual tokens before left padding: the cache holds each row's real tokens as
    one sequence, and the next token continues it as if the row had been alone."""
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(ids)
    if pads == "gap":
        mask[0, 2:5] = 0
    else:
        mask[0, 6:] = 0
    new = torch.randint(0, 300, (2, 2))
    with torch.no_grad():
        cache = model.new_cache(2, max_length=11)
        model(ids, attention_mask=mask, cache=cache)
        last = model(new, cache=cache).logits[:, -1]
        for r in range(2):
            row = torch.cat([ids[r][mask[r].bool()], new[r]])[None]
            torch.testing.assert_close(last[r], model(row).logits[0, -1])


def test_a_cache_continues_left_padding_only(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 6))
    cache = model.new_cache(2)
    with torch.no_grad():  # row 0: pads only so far, then its first tokens; row 1: six real tokens
        model(ids[:, :3], attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]]), cache=cache)
        last = model(ids[:, 3:], attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), cache=cache).logits[:, -1]
        torch.testing.assert_close(last[0], model(ids[:1, 4:]).logits[0, -1])
        torch.testing.assert_close(last[1], model(ids[1:]).logits[0, -1])
    for mask in (torch.tensor([[1, 1], [0, 1]]), torch.tensor([[1, 1], [1, 0]]), torch.tensor([[1], [0]])):
        with pytest.raises(ValueError, match=r"row 1 has padding after a real token \(in this call or in the cache"):
            model(ids[:, : mask.shape[1]], attention_mask=mask, cache=cache)
    assert cache.seqlen == 6  # the refused calls left the cache as it was
    one = model.new_cache(2)
    with torch.no_grad():
        model(ids[:, :1], cache=one)  # one real token per row
    with pytest.raises(ValueError, match=r"row 0 has padding after a real token"):
        model(ids[:, 1:4], attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), cache=one)
    with pytest.raises(ValueError, match=r"row 0 has padding after a real token"):
        model(ids[:, 1:4], attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), cache=one)


def test_labels_are_checked_before_the_cache_moves(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 6))
    loss = model(ids, labels=ids).loss
    torch.testing.assert_close(model(ids, labels=ids.int()).loss, loss)
    torch.testing.assert_close(model(ids, labels=ids.int(), return_logits=False).loss, loss)
    cache = model.new_cache(2)
    for labels, match in [(torch.full((2, 6), 300), r"labels must lie in \[0, vocab_size=300\) or be -100 "
                                                    r"\(ignored\), got values in \[300, 300\]"),
                          (torch.full((2, 6), -2), r"labels must lie in .* in \[-2, -2\]"),
                          (ids.double(), "labels must be an integer tensor"),
                          (ids[:, :5], r"of the shape of input_ids \(2, 6\)")]:
        with pytest.raises(ValueError, match=match):
            model(ids, labels=labels, cache=cache)
    assert cache.seqlen == 0


def test_input_ids_of_a_floating_dtype_are_refused_by_name(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 6))
    for bad in (ids.double(), ids.bool(), ids[0]):
        with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \(B, T\), got"):
            model(bad)
    torch.testing.assert_close(model(ids.int()).logits, model(ids).logits)


def test_masks_hold_zeros_and_ones_and_inputs_are_tensors(tiny_model):
    """An additive mask (0 = keep, -1e9 = pad) read as 1/0 would reverse the padding: refused by value."""
    model = tiny_model()
    ids = torch.randint(0, 300, (1, 5))
    ref = model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1]])).logits
    for same in (torch.tensor([[False, True, True, True, True]]), torch.tensor([[0.0, 1, 1, 1, 1]])):
        torch.testing.assert_close(model(ids, attention_mask=same).logits, ref)
    for bad in (-1e9, 0.5, 2.0, float("nan")):
        mask = torch.tensor([[bad, 1, 1, 1, 1]])
        with pytest.raises(ValueError, match=r"attention_mask must hold 1 \(token\) and 0 \(pad\) only"):
            model(ids, attention_mask=mask)
    for name in ("input_ids", "labels", "attention_mask"):
        args = {"input_ids": ids, name: ids.tolist()}
        with pytest.raises(TypeError, match=rf"{name} must be a tensor, got list"):
            model(**args)


def test_an_empty_batch_and_caches_this_model_cannot_continue_raise(tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"at least one row and one token \(B, T >= 1\), got \(0, 4\)"):
        model(torch.zeros(0, 4, dtype=torch.long))
    ids = torch.zeros(1, 4, dtype=torch.long)
    for other in (tiny_model(n_blocks=1), tiny_model(conba_state=16), tiny_model(n_kv_heads=4),
                  tiny_model(attn_per_block=2)):
        with pytest.raises(ValueError, match="cache was made for another model"):
            model(ids, cache=other.new_cache(1))
    model(ids, cache=tiny_model(seed=1).new_cache(1))  # another model of the same config: fine while empty...
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids, cache=cache)
    with pytest.raises(ValueError, match="cache holds what another model computed"):  # ... not once filled
        tiny_model(seed=1)(ids[:, :1], cache=cache)
    copied, unpickled = copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))  # copies continue the model...
    branched = cache.branch(torch.zeros(1, dtype=torch.long))
    for c in (copied, branched):  # ... and only it
        with pytest.raises(ValueError, match="cache holds what another model computed"):
            tiny_model(seed=1)(ids[:, :1], cache=c)
    model_copy, cache_copy = copy.deepcopy((model, cache))  # copied together: the copy's cache is the copy's
    with torch.no_grad():
        expected = model(ids[:, :1], cache=cache).logits
        for m, c in ((model, copied), (model, unpickled), (model, branched), (model_copy, cache_copy)):
            torch.testing.assert_close(m(ids[:, :1], cache=c).logits, expected, rtol=0, atol=0)
    with torch.inference_mode():
        inference = model.new_cache(1)
        model(ids, cache=inference)
    with pytest.raises(ValueError, match=r"cache holds tensors made under torch.inference_mode\(\) \(it was made "):
        model(ids[:, :1], cache=inference)
    with torch.inference_mode():  # refused before anything moved: it continues where it was
        torch.testing.assert_close(model(ids[:, :1], cache=inference).logits[:, -1], model(
            torch.cat([ids, ids[:, :1]], 1)).logits[:, -1])
    wrong = MixConCache(model.config, 1)  # fp32 by default; the model is fp64
    with pytest.raises(ValueError, match=r"cache holds torch.float32 on cpu, the model computes in torch.float64"):
        model(ids, cache=wrong)
    assert not wrong.broken and wrong.seqlen == 0  # refused before anything moved
    empty = model.new_cache(1)
    with pytest.raises(ValueError, match=r"seq_idx \(packed documents\) is for forwards without a cache"):
        model(ids, cache=empty, seq_idx=torch.zeros_like(ids))
    with torch.no_grad():  # refused after it was claimed, still empty: any model's
        torch.testing.assert_close(tiny_model(seed=1)(ids, cache=empty).logits, tiny_model(seed=1)(ids).logits)


def test_a_cache_made_outside_inference_mode_but_grown_there_is_refused_outside_it_for_what_it_is(tiny_model):
    """A forward under inference_mode that grows a cache made outside it leaves inference tensors in it: continued
    outside, it is refused, and the error says that it grew there (making it outside, as the error used to
    advise, is what was done)."""
    model = tiny_model()
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        cache = model.new_cache(1, max_length=2)
    with torch.inference_mode():
        model(ids, cache=cache)  # 6 tokens: the cache grows, under inference_mode
    with pytest.raises(ValueError, match=r"made under torch.inference_mode\(\) \(it was made there, or grew or "
                                         r"was reordered there\)"):
        model(ids[:, :1], cache=cache)


def test_paper_preset_builds_on_meta_and_counts_parameters():
    config = MixConConfig.preset("mixcon-paper")
    with torch.device("meta"):
        model = MixConForCausalLM(config)
    total, active = model.num_parameters(), model.num_parameters(active=True)
    assert 40e9 < total < 80e9 and 10e9 < active < 25e9 and active < total
    assert "CCACCCAC/DMDMDMDM" in model.summary()


def test_parameter_counts_by_hand():
    config = MixConConfig.preset("tiny")
    model = MixConForCausalLM(config)
    moe = next(layer.ffn for layer in model.layers if layer.ffn_kind == "moe")
    per_expert = 3 * config.d_model * config.expert_hidden_size
    n_moe = sum(f == "moe" for _, f in config.layout())
    assert model.num_parameters() - model.num_parameters(active=True) == n_moe * 2 * per_expert
    assert moe.w_gate_up.numel() + moe.w_down.numel() == 4 * per_expert


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["mixcon", "conba"])
def test_forward_and_cached_decode_in_fp32_and_bf16_match_the_fp64_model(layout, dtype, tol, device, tiny_model):
    model = tiny_model(**LAYOUTS[layout])
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
        model.to(device, dtype)
        ids = ids.to(device)
        full = model(ids).logits
        cache = model.new_cache(2)
        pieces = [model(ids[:, :24], cache=cache).logits]
        pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(24, 40)]
    for logits in (full, torch.cat(pieces, 1)):
        assert logits.dtype == dtype
        assert float((logits.double().cpu() - ref).norm() / ref.norm()) < tol


@pytest.mark.parametrize("layout", ["mixcon", "conba"])
def test_cached_decode_and_generate_under_bf16_autocast(layout, tiny_model):
    """Autocast on fp32 weights (the trainer's GPU precision): the fp32 caches take bf16 keys and values."""
    model = tiny_model(**LAYOUTS[layout])
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = model(ids).logits
            cache = model.new_cache(2)
            pieces = [model(ids[:, :24], cache=cache).logits]
            pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(24, 40)]
            out = model.generate(ids[:, :24], 5)
    for logits in (full, torch.cat(pieces, 1)):
        assert float((logits.double() - ref).norm() / ref.norm()) < 5e-2
    assert out.shape == (2, 29) and torch.equal(out[:, :24], ids[:, :24])


@pytest.mark.parametrize("layout", ["mixcon", "dense"])
def test_bf16_autocast_training_step(layout, tiny_model):
    """The mixed-precision step the trainer takes on a GPU (here on the CPU): finite loss, every grad fp32."""
    model = tiny_model(dtype=torch.float32, **LAYOUTS[layout]).train()
    ids = torch.randint(0, 300, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def _documents_alone(model, ids, lengths):
    """Logits of each row's documents run one by one, concatenated: (B, T, V)."""
    rows = []
    for b, row in enumerate(lengths):
        spans = torch.tensor(row).cumsum(0).tolist()
        rows.append(torch.cat([model(ids[b:b + 1, s - n:s]).logits for s, n in zip(spans, row, strict=True)], 1))
    return torch.cat(rows)


PACKED = [[4, 1, 9, 6], [11, 9]]  # document lengths per row: a one-token document, starts mid-chunk


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_documents_equal_each_document_alone(layout, tiny_model):
    model = tiny_model(**LAYOUTS[layout])
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in PACKED])
    with torch.no_grad():
        packed = model(ids, seq_idx=seq_idx + 5).logits
        alone = _documents_alone(model, ids, PACKED)
        whole = model(ids).logits
    torch.testing.assert_close(packed, alone, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(packed[:, 4:], whole[:, 4:])  # documents do see each other without seq_idx


def test_packed_gradients_equal_each_document_alone(tiny_model):
    model = tiny_model(attn_rope=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in PACKED])
    w = torch.randn(2, 20, model.config.vocab_size, dtype=torch.float64)
    grads = []
    for logits in (lambda: model(ids, seq_idx=seq_idx).logits, lambda: _documents_alone(model, ids, PACKED)):
        model.zero_grad()
        (logits() * w).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_seq_idx_of_one_document_per_row_takes_the_plain_causal_forward(tiny_model, monkeypatch):
    """A row of one document needs no document masks: the layers see no seq_idx (SDPA's causal mask, the
    unmasked conv and scan), and the logits are those without seq_idx, bit for bit."""
    from mixcon.layers.context import ForwardContext

    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    contexts = []
    build = ForwardContext.build
    monkeypatch.setattr(ForwardContext, "build", lambda *a, **kw: contexts.append(build(*a, **kw)) or contexts[-1])
    with torch.no_grad():
        plain = model(ids).logits
        one = model(ids, seq_idx=torch.tensor([[3] * 20, [0] * 20])).logits
        model(ids, seq_idx=torch.tensor([[0] * 10 + [1] * 10] * 2))
    assert torch.equal(one, plain)
    assert [ctx.seq_idx is None and ctx.causal for ctx in contexts] == [True, True, False]


def test_seq_idx_errors_name_the_problem(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    # The model checks them itself, by the argument's name, whatever its layers (here without Conba, whose
    # kernels check too)
    for checked in (model, tiny_model(**LAYOUTS["transformer"])):
        with pytest.raises(ValueError, match=r"^seq_idx must be \(B, T\)=\(2, 6\)"):
            checked(ids, seq_idx=docs[:, :5])
        with pytest.raises(ValueError, match=r"^seq_idx must be non-decreasing"):
            checked(ids, seq_idx=docs.flip(1))
    with pytest.raises(ValueError, match="without a cache"):
        model(ids, seq_idx=docs, cache=model.new_cache(2))
    mask = torch.ones(2, 6, dtype=torch.long)
    model(ids, seq_idx=docs, attention_mask=mask)  # no padding: fine
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="cannot be combined with padding"):
        model(ids, seq_idx=docs, attention_mask=mask)


def test_inputs_embeds_enter_in_the_embeddings_dtype_and_leave_a_cache_usable(tiny_model):
    """fp16 vectors into an fp32 model are taken in fp32 (they failed deep in a matmul and marked a good cache
    broken); vectors on another device are refused by name before the cache is touched."""
    model = tiny_model(dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    embeds = model.embed(ids).detach()
    cache = model.new_cache(1, 8)
    out = model(inputs_embeds=embeds.half(), cache=cache)
    torch.testing.assert_close(out.logits, model(inputs_embeds=embeds.half().float()).logits)
    with pytest.raises(ValueError, match=r"inputs_embeds is on meta, the model on cpu"):
        model(inputs_embeds=embeds.to("meta"), cache=cache)
    for name in ("input_ids", "labels", "attention_mask"):  # (the range check read them: "cannot call item()")
        given = {"input_ids": ids, name: (ids if name != "attention_mask" else torch.ones_like(ids)).to("meta")}
        with pytest.raises(ValueError, match=rf"^{name} is on meta, the model on cpu: move it there"):
            model(**given)
    model(torch.tensor([[9]]), cache=cache)  # the cache goes on


def test_uncompile_undoes_compile_decode_and_compile_prefill(tiny_model, tmp_path):
    """Decoding and prefill go eager again (no compiled graph is called), copies too; from_pretrained onto
    the meta device is refused as such (it blamed the weights file)."""
    calls = []

    def backend(gm, example_inputs):
        calls.append(1)
        return gm.forward

    model = tiny_model(dtype=torch.float32)
    prompt = torch.tensor([[5, 6, 7]])
    expected = model.generate(prompt, 3)
    model.compile_decode(backend=backend)
    model.compile_prefill(segment=2, backend=backend)
    model.uncompile()
    assert torch.equal(model.generate(prompt, 3), expected) and calls == []
    assert all(getattr(layer.mixer, "prefill", None) is None for layer in model.layers)
    assert torch.equal(copy.deepcopy(model).generate(prompt, 3), expected) and calls == []
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"device='meta' holds no weights"):
        MixConForCausalLM.from_pretrained(tmp_path, device="meta")


def test_initialisation_scales():
    """Normal(0, init_std) weights; the projections that write into the residual stream (out_proj, the FFNs' and
    experts' down) by 1/sqrt(2 n_layers), as GPT-2 scales them; the selection MLP's own down not; rho_bias 5."""
    torch.manual_seed(0)
    config = MixConConfig.preset("tiny")
    model = MixConForCausalLM(config)
    std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.n_layers)

    def pooled(suffix: str, inside: str = "") -> float:
        return float(torch.cat([p.detach().flatten() for n, p in model.named_parameters()
                                if n.endswith(suffix) and inside in n]).std())

    assert pooled("out_proj.weight") == pytest.approx(out_std, rel=0.05)
    assert pooled("ffn.down.weight") == pytest.approx(out_std, rel=0.05)
    assert pooled("w_down") == pytest.approx(out_std, rel=0.05)
    assert pooled("down.weight", ".sel.") == pytest.approx(std, rel=0.1)
    assert pooled("in_proj.weight") == pytest.approx(std, rel=0.05)
    assert all(bool((p == 5.0).all()) for n, p in model.named_parameters() if n.endswith("rho_bias"))


def test_pad_positions_stay_finite_whatever_their_embeddings(tiny_model):
    """A pad is zeroed as it enters the layers (its embedding may be anything, NaN included), so every position's
    output is finite; real positions are those of the rows alone."""
    model = tiny_model(dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    embeds = model.embed(ids).detach().clone()
    embeds[0, :2] = float("nan")
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        alone = model(ids[:1, 2:]).logits
    assert torch.isfinite(out.logits).all() and (out.hidden_states[0][0, :2] == 0).all()
    torch.testing.assert_close(out.logits[0, 2:], alone[0])


def test_a_training_model_decodes_with_its_process_noise(tiny_model):
    """In training mode (here without autograd) a one-token step with a cache takes the path that adds Conba's
    process noise, as every training forward does; in eval mode the step is deterministic."""
    model = tiny_model(dtype=torch.float32, conba_process_noise=0.5)
    ids = torch.randint(0, 300, (1, 4))

    def step(seed: int) -> torch.Tensor:
        cache = model.new_cache(1)
        torch.manual_seed(0)
        model(ids[:, :3], cache=cache)
        torch.manual_seed(seed)
        return model(ids[:, 3:], cache=cache).logits

    with torch.no_grad():
        model.train()
        assert not torch.equal(step(1), step(2))
        model.eval()
        assert torch.equal(step(1), step(2))
