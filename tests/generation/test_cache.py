"""The decoding cache: its size by formula, rows selected and branched, detached for truncated backpropagation,
refused once a forward broke it."""

from __future__ import annotations

import pytest
import torch

from mixcon import cache_nbytes

LAYOUTS = {"mixcon": {}, "transformer": dict(attn_per_block=4), "conba": dict(attn_per_block=0)}


def test_a_forward_with_autograd_through_a_cache_keeps_its_capacity(tiny_model):
    """K and V made anew under autograd keep the cache's whole capacity (the key mask's, `cache_nbytes`'), so that
    after `detach_()` decoding continues where the training forward ended."""
    model = tiny_model().train()
    ids = torch.randint(0, 300, (1, 8))
    cache = model.new_cache(1, max_length=16)
    model(ids[:, :4], cache=cache).logits.sum().backward()
    assert cache.nbytes() == cache_nbytes(model.config, 1, 16, torch.float64)
    assert cache.detach_() is cache
    model.eval()
    with torch.no_grad():
        rest = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(4, 8)], 1)
        torch.testing.assert_close(rest, model(ids).logits[:, 4:], rtol=1e-9, atol=1e-9)


def test_truncated_backpropagation_through_a_detached_cache(tiny_model):
    """Train on a long sequence piece by piece through one cache: after `cache.detach_()` each piece's backward
    stops at the cache (its gradients are those of the piece continuing a cache filled without autograd), and
    the logits are still those of the whole sequence."""
    model = tiny_model(router_aux_loss_coef=0.0)
    ids = torch.randint(0, 300, (2, 12))
    cache = model.new_cache(2)
    pieces = []
    for piece in (ids[:, :6], ids[:, 6:]):
        model.zero_grad()
        logits = model(piece, cache=cache).logits
        slots = [s for layer in cache.layers for s in getattr(layer, "slots", ())]
        assert slots and all(s.is_contiguous() for s in slots)  # each ring slot its own contiguous tensor
        logits.square().mean().backward()  # the second piece's backward would reach the first's freed graph
        cache.detach_()
        pieces.append(logits.detach())
    got = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(torch.cat(pieces, 1), model(ids).logits.detach(), rtol=1e-9, atol=1e-9)
    model.zero_grad()
    fresh = model.new_cache(2)
    with torch.no_grad():
        model(ids[:, :6], cache=fresh)
    model(ids[:, 6:], cache=fresh).logits.square().mean().backward()
    for a, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-12)


def test_a_cache_left_half_updated_by_a_failed_forward_is_refused(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 8))
    cache = model.new_cache(2)
    model(ids[:, :5], cache=cache)
    last = model.layers[-1]
    hook = last.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):  # after the other layers moved on
        model(ids[:, 5:], cache=cache)
    hook.remove()
    with pytest.raises(ValueError, match=r"a forward raised while updating it.*model.new_cache"):
        model(ids[:, 5:], cache=cache)


@pytest.mark.parametrize("layout", ["mixcon", "conba", "transformer"])
def test_cache_select_rows_continues_the_kept_rows(layout, tiny_model):
    model = tiny_model(**LAYOUTS[layout])
    ids = torch.randint(0, model.config.vocab_size, (3, 15))
    kept = torch.tensor([2, 0])
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(3, max_length=4)
        model(ids[:, :9], cache=cache)
        cache.select_rows(kept)
        chunk = model(ids[kept, 9:12], cache=cache).logits
        step = model(ids[kept, 12:13], cache=cache).logits  # one decoding step
    assert cache.batch_size == 2
    torch.testing.assert_close(torch.cat([chunk, step], 1), full[kept, 9:13], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["mixcon", "conba", "transformer"])
def test_cache_branch_continues_copies_of_rows_and_leaves_the_cache_as_is(layout, tiny_model):
    model = tiny_model(**LAYOUTS[layout])
    ids = torch.randint(0, model.config.vocab_size, (2, 14))
    rows = torch.tensor([1, 1, 0])
    futures = torch.randint(0, model.config.vocab_size, (3, 5))  # a different continuation per branch row
    with torch.no_grad():
        cache = model.new_cache(2, max_length=4)
        model(ids[:, :9], cache=cache)
        branch = cache.branch(rows)
        got = torch.cat([model(futures[:, :3], cache=branch).logits, model(futures[:, 3:4], cache=branch).logits], 1)
        want = model(torch.cat([ids[rows, :9], futures], 1)).logits[:, 9:13]
        rest = model(ids[:, 9:], cache=cache).logits  # the original cache goes on as if never branched
        full = model(ids).logits[:, 9:]
    assert branch.batch_size == 3 and cache.batch_size == 2
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rest, full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["mixcon", "transformer", "conba"])
def test_cache_bytes_formula_equals_allocation(layout, tiny_model):
    model = tiny_model(dtype=torch.float32, **LAYOUTS[layout])
    cache = model.new_cache(3, max_length=100)
    assert cache.nbytes() == cache_nbytes(model.config, 3, 100)
    with torch.no_grad():
        model(torch.randint(0, 300, (3, 100)), cache=cache)
    assert cache.nbytes() == cache_nbytes(model.config, 3, 100)  # no growth when it fits
    c = model.config
    conba_layer = (c.conba_conv - 1) * (c.conba_inner + 2 * c.conba_groups * c.conba_state) * 4 * 3 + \
        max(c.conba_delay, 1) * c.conba_heads * c.conba_head_dim * c.conba_state * 4 * 3
    attn_layer = 2 * 100 * c.n_kv_heads * c.attn_head_dim * 4 * 3
    expected = [attn_layer if m == "attention" else conba_layer for m, _ in c.layout()]
    assert cache.layer_nbytes() == expected
    with torch.no_grad():  # a chunk that needs twice the capacity: room for it, not one position more
        model(torch.randint(0, 300, (3, 100)), cache=cache)
    assert cache.nbytes() == cache_nbytes(model.config, 3, 200) and cache.key_mask.shape[1] == 200


def test_chunks_and_steps_in_any_order_continue_a_ring_of_three_states(tiny_model):
    """tau = 3: a chunk after decoding steps (the ring's oldest slot no longer the first) reads the states oldest
    first and leaves the ring for the steps after it; the logits are those of the whole sequence."""
    model = tiny_model(conba_delay=3)
    ids = torch.randint(0, 300, (2, 14))
    with torch.no_grad():
        cache = model.new_cache(2)
        pieces = [model(ids[:, :5], cache=cache).logits]
        for start, end in ((5, 6), (6, 7), (7, 10), (10, 11), (11, 12), (12, 14)):
            pieces.append(model(ids[:, start:end], cache=cache).logits)
        torch.testing.assert_close(torch.cat(pieces, 1), model(ids).logits, rtol=1e-9, atol=1e-9)


def test_a_frozen_models_chunk_leaves_the_keys_an_earlier_backward_needs(tiny_model):
    """A forward with autograd through a frozen model (its K and V need no gradient) after one whose cache does need
    it (trainable input embeddings): K and V are made anew, so the backward through both chunks still finds the
    tensors the first chunk saved, and the gradient is the whole sequence's."""
    model = tiny_model(router_aux_loss_coef=0.0, **LAYOUTS["transformer"]).requires_grad_(False)
    ids = torch.randint(0, 300, (1, 9))  # (the first layer's K and V of the last chunk: its tokens' alone)
    embeds = model.embed(ids[:, :6]).detach().requires_grad_(True)
    cache = model.new_cache(1)
    logits = [model(inputs_embeds=embeds[:, :3], cache=cache).logits,
              model(inputs_embeds=embeds[:, 3:], cache=cache).logits,  # saves the cache's K and V for its backward
              model(ids[:, 6:], cache=cache).logits]
    sum(x.square().sum() for x in logits).backward()
    whole = embeds.detach().clone().requires_grad_(True)
    inputs = torch.cat([whole, model.embed(ids[:, 6:])], 1)
    model(inputs_embeds=inputs).logits.square().sum().backward()
    torch.testing.assert_close(embeds.grad, whole.grad, rtol=1e-9, atol=1e-9)


def test_get_seq_length_counts_the_positions_written_pads_included(tiny_model):
    """transformers' `Cache.get_seq_length`: every position written, a row's pads too."""
    model = tiny_model()
    cache = model.new_cache(2)
    assert cache.get_seq_length() == 0
    with torch.no_grad():
        model(torch.randint(0, 300, (2, 5)), attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1] * 5]), cache=cache)
        model(torch.randint(0, 300, (2, 1)), cache=cache)
    assert cache.get_seq_length() == 6 and cache.positions.tolist() == [4, 6]


def test_a_cache_grown_past_its_limit_doubles_again(tiny_model):
    """Growing stops at `limit` (a generation's whole length) while the positions fit in it; past it the capacity
    doubles again rather than growing one position at a time."""
    model = tiny_model()
    cache = model.new_cache(1, max_length=4)
    cache.limit = 6
    with torch.no_grad():
        model(torch.randint(0, 300, (1, 5)), cache=cache)
        assert cache.key_mask.shape[1] == 6
        for _ in range(2):
            model(torch.randint(0, 300, (1, 1)), cache=cache)
    attention = [layer for layer in cache.layers if hasattr(layer, "k")]
    assert cache.key_mask.shape[1] == 12 and attention and all(layer.k.shape[2] == 12 for layer in attention)


def test_a_cache_needs_one_position_at_least():
    from mixcon import MixConCache, MixConConfig

    with pytest.raises(ValueError, match=r"batch_size=1 and max_length=0 must be integers >= 1"):
        MixConCache(MixConConfig.preset("tiny"), 1, 0)


def test_a_cache_whose_conba_layers_differ_is_refused(tiny_model):
    """Conba caches where the model has attention, or with another conv width or ring of states: refused before
    anything runs (the existing checks: tests/models/test_mixcon.py)."""
    ids = torch.zeros(1, 4, dtype=torch.long)
    more_attention = tiny_model(attn_per_block=2, layer_pattern="CAAC")  # CCAC: a Conba cache for its layer 1
    for model, cache_of in ((more_attention, tiny_model()), (tiny_model(), tiny_model(conba_conv=2)),
                            (tiny_model(), tiny_model(conba_delay=3))):
        with pytest.raises(ValueError, match="cache was made for another model"):
            model(ids, cache=cache_of.new_cache(1))
