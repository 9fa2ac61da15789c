"""The transformers wrapper against the MixCon model itself: forward, loss, generate (greedy, sampled, beam
search), save and load through the Auto classes, the tokenizer and a text-generation pipeline."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", minversion="5", reason="needs transformers >= 5")

from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, DynamicCache, GenerationConfig, pipeline

from mixcon import MixConCache, MixConConfig, MixConForCausalLM
from mixcon.data import ByteTokenizer
from mixcon.data.tokenizer import mismatch, train_bpe_tokenizer
from mixcon.generation.cache import AttentionCache
from mixcon.integrations.transformers import MixConHFConfig, MixConHFForCausalLM, export_hf, hf_tokenizer
from mixcon.training.checkpoint import latest_checkpoint, load_model_and_tokenizer, save_checkpoint

EOS, PAD = 299, 298  # of the `tiny` preset's 300 ids


@pytest.fixture
def pair(tiny_model):
    """A tiny MixCon model (fp64) and its transformers wrapper, which share parameters."""
    model = tiny_model(eos_token_id=EOS, pad_token_id=PAD)
    return model, MixConHFForCausalLM.from_mixcon(model).eval()


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, 290, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :7] = 0, 0
    return ids.masked_fill(mask == 0, PAD), mask


def test_forward_logits_and_loss_are_the_models(pair):
    model, hf = pair
    ids, mask = left_padded()
    out = hf(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    ref = model(ids, attention_mask=mask, labels=F.pad(ids[:, 1:], (0, 1), value=-100))
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.aux_loss, ref.aux_loss)
    # HF's own convention: the mean cross-entropy of each position's logits against the next input; but a pad
    # predicts nothing (its target is not scored, -100 or not).
    real = mask[:, :-1].bool()
    lm = F.cross_entropy(out.logits[:, :-1][real], ids[:, 1:][real])
    torch.testing.assert_close(ref.lm_loss, lm)
    # the Trainer's num_items_in_batch counts the same targets: the summed loss over it is that mean
    summed = hf(ids, attention_mask=mask, labels=ids, num_items_in_batch=real.sum()).loss
    torch.testing.assert_close(summed, lm)
    assert hf(ids, return_dict=False)[0].shape == (3, 11, 300)
    with torch.no_grad():  # an evaluating forward with labels (the Trainer's evaluation) makes no cache
        assert hf(ids, attention_mask=mask, labels=ids).past_key_values is None
        assert hf(ids, attention_mask=mask).past_key_values is not None
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers fills them for left padding
    assert torch.equal(hf(ids, attention_mask=mask, position_ids=positions).logits, out.logits)  # not documents


def test_transformers_generate_decodes_through_capture_decodes_graphs(pair, graph_stand_in):
    """The wrapper's decoding steps are the model's: after `capture_decode` they replay its graphs (a stand-in
    here), with the same tokens."""
    model, hf = pair
    ids, mask = left_padded()
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    graphs = graph_stand_in.install(model)
    assert torch.equal(hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), expected)
    assert len(graphs.graphs) == 2 and graphs.replays == 5  # 7 steps, two ring phases


def test_beam_search_replays_capture_decodes_graphs(pair, graph_stand_in):
    """Beam search reorders the cache every step: in place, so that the graphs of its tensors still apply (new
    tensors each step would capture a graph per step and replay none)."""
    model, hf = pair
    ids, mask = left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=3)
    expected = hf.generate(ids, **kwargs)
    graphs = graph_stand_in.install(model)
    assert torch.equal(hf.generate(ids, **kwargs), expected)
    assert len(graphs.graphs) == 2 and graphs.replays == 7  # 9 steps, two ring phases


def test_outputs_are_ordered_as_mixtrals(pair):
    """aux_loss only with output_router_logits (argument or config), as Mixtral: the tuple form is then (loss,
    logits, past_key_values), and the Trainer leaves aux_loss out of its predictions. The loss counts the router
    losses while training or with output_router_logits; an evaluating model's loss is the language model's
    (the Trainer's eval_loss, a perplexity)."""
    model, hf = pair
    ids, mask = left_padded()
    loss, logits = hf(ids, attention_mask=mask, labels=ids, return_dict=False)
    out = hf(ids, attention_mask=mask, labels=ids)
    assert out.aux_loss is None and torch.equal(loss, out.loss) and torch.equal(logits, out.logits)
    ref = model(ids, attention_mask=mask, labels=F.pad(ids[:, 1:], (0, 1), value=-100))
    assert ref.router_loss > 0 and torch.equal(out.loss, ref.lm_loss)
    assert torch.equal(hf(ids, attention_mask=mask, labels=ids, output_router_logits=True).loss, ref.loss)
    hf.train()
    assert torch.equal(hf(ids, attention_mask=mask, labels=ids).loss, ref.loss)
    hf.eval()
    with torch.no_grad():
        assert isinstance(hf(ids, return_dict=False)[1], MixConCache)  # the cache after the logits
    hf.config.output_router_logits = True
    assert torch.equal(hf(ids, attention_mask=mask, labels=ids).aux_loss,
                       hf(ids, attention_mask=mask, labels=ids, output_router_logits=True).aux_loss)
    assert "aux_loss" in hf.config.keys_to_ignore_at_inference


def test_router_logits_give_mixtrals_load_balancing_loss(pair):
    """Each MoE layer's router logits (B·T, n_experts), as Mixtral returns them: transformers' own
    load_balancing_loss_func over them (which counts each of the K choices, so K times ours) is our aux_loss;
    a pad's row is 0 and a real token's are those of its row alone."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model, hf = pair
    ids, mask = left_padded()
    n, k = model.config.n_experts, model.config.top_k
    out = hf(ids, attention_mask=mask, output_router_logits=True)
    assert len(out.router_logits) == sum(layer.ffn_kind == "moe" for layer in model.layers) > 1
    assert all(r.shape == (3 * 11, n) for r in out.router_logits)
    theirs = torch.stack([load_balancing_loss_func((r,), n, k, mask) for r in out.router_logits]).mean()
    torch.testing.assert_close((theirs / k).double(), out.aux_loss, rtol=1e-5, atol=1e-6)  # (theirs: in fp32)
    alone = hf(ids[2:, 7:], output_router_logits=True).router_logits
    for padded, row in zip(out.router_logits, alone, strict=True):
        torch.testing.assert_close(padded.view(3, 11, n)[2, 7:], row)
        assert bool(padded.view(3, 11, n)[2, :7].eq(0).all())
    assert hf(ids).router_logits is None


def test_hidden_states_are_the_models(pair):
    model, hf = pair
    ids, mask = left_padded()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        theirs = hf(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        hf.config.output_hidden_states = True
        assert len(hf(ids, attention_mask=mask, return_dict=False)[-1]) == len(ours)
    assert len(theirs) == model.config.n_layers + 1
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))


def test_a_cache_is_made_by_default_only_where_it_can_be_continued(pair):
    """Not for right-padded rows (scored as the model scores them), nor while autograd records the forward
    (a training loop without labels: backward works, with the model's gradients)."""
    model, hf = pair
    ids = torch.randint(0, 290, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        out = hf(ids, attention_mask=mask)
        assert out.past_key_values is None
        assert torch.equal(out.logits, model(ids, attention_mask=mask).logits)
        assert isinstance(hf(ids).past_key_values, MixConCache)  # what generate continues
    hf.train()
    out = hf(ids)
    assert out.past_key_values is None
    out.logits.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(ids).logits.square().mean().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))


def test_config_takes_mixcon_fields_as_keywords(tiny_model, tmp_path):
    assert MixConHFConfig(d_model=64, n_blocks=1).to_mixcon() == MixConConfig(d_model=64, n_blocks=1)
    tiny = MixConConfig.preset("tiny")
    assert MixConHFConfig(mixcon=tiny, n_blocks=1).to_mixcon() == tiny.replace(n_blocks=1)
    with pytest.raises(ValueError, match=r"MixConConfig.d_model=-1 is invalid"):
        MixConHFConfig(d_model=-1)
    model = tiny_model(dtype=torch.float32, d_model=48)
    model.save_pretrained(tmp_path)  # MixConConfig's fields at the top of config.json
    assert MixConHFConfig.from_pretrained(tmp_path).to_mixcon() == model.config


def test_a_model_made_from_a_config_begins_texts_with_its_eos_token():
    """As in training (documents follow an EOS): a prompt-less generate starts there, also for a model made by
    AutoModelForCausalLM.from_config (not only by from_mixcon)."""
    hf = AutoModelForCausalLM.from_config(MixConHFConfig(mixcon=MixConConfig.preset("tiny", eos_token_id=7)))
    assert hf.generation_config.bos_token_id == 7


def test_both_loaders_read_an_edited_config_json_alike(tmp_path):
    """A transformers name at the top of the wrapper's config.json (edited by hand) sets its field over the "mixcon"
    entry for the native loader as for AutoConfig (the native one read "mixcon" alone: two different models)."""
    MixConHFForCausalLM(MixConHFConfig(mixcon=MixConConfig.preset("tiny"))).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    written = json.loads(path.read_text())
    path.write_text(json.dumps({**written, "num_experts_per_tok": 1, "eos_token_id": 5}))
    native = MixConForCausalLM.from_pretrained(tmp_path).config
    assert (native.top_k, native.eos_token_id) == (1, 5)
    assert MixConHFConfig.from_pretrained(tmp_path).to_mixcon() == native
    path.write_text(json.dumps({**written, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"config.json: not a valid model config \(num_hidden_layers=3 disagrees "
                                         r"with the MixConConfig's 8 layers"):
        MixConForCausalLM.from_pretrained(tmp_path)


def test_config_answers_to_transformers_names(tmp_path):
    config = MixConHFConfig(hidden_size=64, num_attention_heads=2, num_local_experts=4, num_experts_per_tok=1,
                            tie_word_embeddings=False)
    mixcon = config.to_mixcon()
    assert (mixcon.d_model, mixcon.n_heads, mixcon.n_experts, mixcon.top_k) == (64, 2, 4, 1)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, mixcon.n_layers, 2)
    assert config.tie_word_embeddings is False and mixcon.tie_embeddings is False
    hf = MixConHFForCausalLM(config)
    assert hf.model.lm_head.weight is not hf.model.embed.weight
    # Set later, a special id reaches the MixConConfig that the saved config.json holds.
    hf.config.pad_token_id = 7
    hf.save_pretrained(tmp_path)
    assert MixConForCausalLM.from_pretrained(tmp_path).config.pad_token_id == 7
    assert MixConHFConfig.from_pretrained(tmp_path).pad_token_id == 7
    with pytest.raises(ValueError, match="d_model"):
        config.hidden_size = 0
    with pytest.raises(AttributeError, match="num_hidden_layers follows the MixConConfig"):
        config.num_hidden_layers = 3
    # config.json and to_dict carry the names tools read from a causal LM's config, and they load back.
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["vocab_size"], written["num_hidden_layers"], written["hidden_size"]) == \
        (mixcon.vocab_size, mixcon.n_layers, 64)
    assert {k: config.to_dict()[k] for k in ("vocab_size", "num_hidden_layers")} == \
        dict(vocab_size=mixcon.vocab_size, num_hidden_layers=mixcon.n_layers)
    with pytest.raises(ValueError, match=rf"num_hidden_layers=3 disagrees with the MixConConfig's {mixcon.n_layers}"):
        MixConHFConfig.from_dict({**config.to_dict(), "num_hidden_layers": 3})
    config.update(config.to_dict())  # transformers' update with the config's own dict (its num_hidden_layers too)
    one_block = MixConHFConfig(**{**config.to_dict(), "n_blocks": 1})  # a layout given beside the old count wins
    assert one_block.num_hidden_layers == mixcon.layers_per_block
    assert config != MixConHFConfig(hidden_size=32, num_attention_heads=2) and config == MixConHFConfig.from_dict(
        config.to_dict())  # equality compares the MixConConfig too


def test_greedy_generate_is_mixcon_generate(pair):
    model, hf = pair
    ids, mask = left_padded()
    ours = model.generate(ids, 12, attention_mask=mask, eos_token_id=EOS, pad_token_id=PAD)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(theirs, ours)
    # Without a prompt, generation starts where training documents start: at EOS.
    assert hf.generate(max_new_tokens=3, do_sample=False)[0, 0] == EOS
    # transformers' repetition penalty (its pads left out, as ours are)
    ours = model.generate(ids, 12, attention_mask=mask, eos_token_id=EOS, pad_token_id=PAD, repetition_penalty=1.7)
    assert not torch.equal(ours, theirs)
    assert torch.equal(hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                   repetition_penalty=1.7), ours)
    first = hf.generate(ids, attention_mask=mask, max_new_tokens=2, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="past_key_values: generate starts from the prompt"):
        hf.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=2)


@pytest.mark.parametrize("lengths, capacity", [(dict(max_new_tokens=12), 23), (dict(max_length=20), 20),
                                               (dict(), 31),  # neither: transformers' default, 20 new tokens
                                               (dict(config=GenerationConfig(max_new_tokens=6)), 17),  # by position
                                               (dict(config=GenerationConfig(max_new_tokens=6), max_new_tokens=12),
                                                23),  # a keyword before the config passed
                                               (dict(config=GenerationConfig(), default=7), 18)])  # the model's
def test_generate_makes_a_cache_with_room_for_what_it_asks(pair, monkeypatch, lengths, capacity):
    """The cache a generate call makes holds the prompt and the new tokens asked for: it never grows (which
    copies every K/V and doubles them)."""
    _, hf = pair
    ids, mask = left_padded()  # T = 11
    grown, grow = [], AttentionCache.grow
    monkeypatch.setattr(AttentionCache, "grow", lambda self, *a: grown.append(a) or grow(self, *a))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using the model-agnostic default `max_length`")
        config, default = lengths.pop("config", None), lengths.pop("default", None)
        if default is not None:  # the model's own max_new_tokens, under a config given without one
            hf.generation_config.max_new_tokens = default
        args = (ids,) if config is None else (ids, config)
        out = hf.generate(*args, attention_mask=mask, do_sample=False, return_dict_in_generate=True, **lengths)
    assert out.past_key_values.key_mask.shape[1] == capacity and not grown
    assert hf._lengths is None


def test_a_long_generate_grows_its_cache_up_to_what_it_asks(pair, monkeypatch):
    """Past the room made up front (4,096 new tokens; 3 here), the cache doubles, but not past the prompt and
    max_new_tokens."""
    _, hf = pair
    monkeypatch.setattr("mixcon.generation.generate.PREALLOCATED_NEW_TOKENS", 3)
    ids, mask = left_padded()  # T = 11: 14 positions up front, then 23 (not 28)
    out = hf.generate(ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True, max_new_tokens=12)
    assert out.past_key_values.key_mask.shape[1] == 23 and out.sequences.shape[1] == 23
    cache, seq = out.past_key_values, out.sequences
    with torch.no_grad():  # continued past what generate asked for: doubling again, not one position per token
        for _ in range(3):
            seq = torch.cat([seq, hf(seq[:, -1:], past_key_values=cache).logits[:, -1:].argmax(-1)], 1)
    assert cache.key_mask.shape[1] == 46


def test_generate_stops_at_stop_strings(tiny_model):
    """transformers hands generate's tokenizer to every forward; stop_strings end generation at the first token
    that spells one (here a printable character that no special token's text holds)."""
    tok = hf_tokenizer("bytes")
    model = tiny_model(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf = MixConHFForCausalLM.from_mixcon(model).eval()
    ids = torch.tensor([tok("def f(x):").input_ids])
    torch.manual_seed(0)  # sampling an untrained model: nearly uniform, so a printable byte comes up (~1 - 1e-8)
    full = hf.generate(ids, max_new_tokens=40, do_sample=True, top_k=0)[0, ids.shape[1]:].tolist()
    j = next(i for i, t in enumerate(full) if 33 <= t < 127 and chr(t) not in "<|>abdeops")
    torch.manual_seed(0)
    stopped = hf.generate(ids, max_new_tokens=40, do_sample=True, top_k=0, stop_strings=[chr(full[j])],
                          tokenizer=tok)
    assert stopped[0, ids.shape[1]:].tolist() == full[: j + 1]
    assert len(stopped[0]) < len(ids[0]) + 40


def test_generate_refuses_what_needs_a_cache_cropped_back(pair):
    """Assisted, prompt-lookup and self-speculative decoding roll a cache back over rejected draft tokens, which a
    Conba state cannot; chunked prefill needs transformers' Cache: each refused by name (transformers' own error
    said that no cache was there)."""
    _, hf = pair
    ids, mask = left_padded()
    for kw, what in [(dict(assistant_model=hf), "assisted"), (dict(prompt_lookup_num_tokens=3), "prompt lookup"),
                     (dict(assistant_early_exit=1), "self-speculative"),
                     (dict(prefill_chunk_size=4), "chunked prefill")]:
        with pytest.raises(ValueError, match=f"{next(iter(kw))}: MixConHFForCausalLM does not support {what}"):
            hf.generate(ids, attention_mask=mask, max_new_tokens=3, **kw)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens: MixConHFForCausalLM does not support"):
        hf.generate(ids, GenerationConfig(prompt_lookup_num_tokens=3, max_new_tokens=3), attention_mask=mask)
    hf.generation_config.prompt_lookup_num_tokens = 3  # the model's default, under a config given without it
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens: MixConHFForCausalLM does not support"):
        hf.generate(ids, GenerationConfig(max_new_tokens=3), attention_mask=mask)


def test_right_padded_rows_are_refused_rather_than_continued_without_their_context(pair):
    """No cache is made for right-padded rows, so transformers' loop would feed each new token alone."""
    _, hf = pair
    ids, mask = left_padded()
    with pytest.raises(ValueError, match=r"rows must be left-padded .*padding_side='left'"):
        hf.generate(ids, attention_mask=mask.flip(1), max_new_tokens=3)
    with pytest.raises(ValueError, match="attention_mask covers 9 positions but input_ids 1, and no past_key_values"):
        hf(ids[:, -1:], attention_mask=torch.ones(ids.shape[0], 9, dtype=torch.long))


@pytest.mark.parametrize("options", [dict(do_sample=True, top_k=20), dict(num_beams=3, do_sample=False)])
def test_generate_through_the_cache_equals_full_forwards(pair, options):
    """Sampling and beam search (rows of the cache reordered by beam) against recomputing every step."""
    _, hf = pair
    ids, mask = left_padded()
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        runs.append(hf.generate(ids, attention_mask=mask, max_new_tokens=10, use_cache=use_cache, **options))
    assert runs[0].shape[1] > ids.shape[1]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("options", [dict(max_new_tokens=6), dict(max_length=17), dict(max_new_tokens=6, num_beams=3),
                                     dict(max_new_tokens=6, do_sample=True, top_k=20)])
def test_generate_from_inputs_embeds_is_generate_from_their_ids(pair, options):
    """A prompt given as embeddings generates what its ids do: the new tokens alone, or after input_ids when
    both are given; the cache is made with room for the prompt and the new tokens."""
    _, hf = pair
    ids, mask = left_padded()
    embeds = hf.get_input_embeddings()(ids)
    runs = []
    for prompt in (dict(input_ids=ids), dict(inputs_embeds=embeds), dict(input_ids=ids, inputs_embeds=embeds)):
        torch.manual_seed(0)
        runs.append(hf.generate(**prompt, attention_mask=mask, return_dict_in_generate=True, **options))
    with_ids, alone, both = (run.sequences for run in runs)
    assert with_ids.shape == (3, 17) and torch.equal(alone, with_ids[:, 11:]) and torch.equal(both, with_ids)
    if "num_beams" not in options:  # (beam search keeps a cache per beam)
        assert runs[1].past_key_values.key_mask.shape[1] == 17


def test_generate_from_a_soft_prompt_continues_it_greedily(pair):
    """Vectors that are no token's embedding: generate's tokens are those of feeding each argmax back."""
    _, hf = pair
    soft = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # (a cache is made where autograd does not record)
        out = hf(inputs_embeds=soft, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(3):
            out = hf(tokens[-1], past_key_values=out.past_key_values)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(hf.generate(inputs_embeds=soft, max_new_tokens=4, do_sample=False), torch.cat(tokens, 1))


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_loads_through_the_auto_class(tiny_model, tmp_path, tie):
    hf = MixConHFForCausalLM.from_mixcon(tiny_model(tie_embeddings=tie)).eval()
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mixcon"
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(back, MixConHFForCausalLM) and back.model.config == hf.model.config
    assert (back.model.lm_head.weight is back.model.embed.weight) == tie
    ids, _ = left_padded()
    assert torch.equal(back(ids).logits, hf(ids).logits)
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()  # what attention uses
    assert torch.equal(sdpa(ids).logits, hf(ids).logits)


def test_a_device_map_over_several_places_is_refused_one_device_loads(tiny_model, tmp_path):
    """Offloading (here: layers to disk, as device_map="auto" does when max_memory is short) would leave
    weights that Conba reads outside module forwards unloaded: refused, naming where the map put what."""
    pytest.importorskip("accelerate", reason="device_map needs accelerate")
    hf = MixConHFForCausalLM.from_mixcon(tiny_model(dtype=torch.float32)).eval()
    hf.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=r"runs on one device, its weights in memory; the device_map put it on cpu "
                                         r"\(model\.embed.*; disk \(model\.layers\."):
        AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map="auto", max_memory={"cpu": "300KB"},
                                             offload_folder=str(tmp_path / "offload"))
    with pytest.raises(ValueError, match=r"the device_map put it on disk \(\(the whole model\)\)"):  # one place
        AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map={"": "disk"},
                                             offload_folder=str(tmp_path / "offload"))
    ids, _ = left_padded()
    for device_map in ("auto", {"": "cpu"}, {"": torch.device("cpu")}):
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map).eval()
        assert all(p.device.type == "cpu" for p in back.parameters())
        assert torch.equal(back(ids).logits, hf(ids).logits)
    # One accelerator named four ways is one place (checked without one: the names alone); "cuda" is cuda:0.
    from mixcon.integrations.transformers import _check_device_map

    _check_device_map({"model.embed": 0, "model.layers": "cuda:0", "model.norm": "cuda",
                       "model.lm_head": torch.device("cuda", 0)})
    with pytest.raises(ValueError, match=r"put it on cuda:0 \(a\); cuda:1 \(b\)"):
        _check_device_map({"a": 0, "b": 1})


def test_from_mixcon_loads_a_saved_mixcon_model(tiny_model, tmp_path):
    model = tiny_model(dtype=torch.float32)
    hf = MixConHFForCausalLM.from_mixcon(model).eval()
    model.save_pretrained(tmp_path)
    loaded = MixConHFForCausalLM.from_mixcon(tmp_path)
    assert not loaded.training and not loaded.model.training  # one mode: the wrapper's picks its loss
    assert MixConHFForCausalLM.from_mixcon(model.train()).training  # a model given: its mode
    model.eval()
    ids, mask = left_padded()
    assert torch.equal(loaded(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # loaded in fp32 (for training) unless told
    assert {p.dtype for p in MixConHFForCausalLM.from_mixcon(tmp_path / "bf16").parameters()} == {torch.float32}
    assert {p.dtype for p in MixConHFForCausalLM.from_mixcon(tmp_path / "bf16", dtype="auto").parameters()} \
        == {torch.bfloat16}


@pytest.mark.parametrize("collate", [dict(), dict(return_seq_idx=True, return_position_ids=False),
                                     dict(return_flash_attn_kwargs=True, return_position_ids=False)],
                         ids=["position_ids", "seq_idx", "flash_attn_kwargs"])
def test_padding_free_batches_score_each_document_alone(pair, collate):
    """transformers' DataCollatorWithFlattening packs documents into one row: loss and logits are those of
    each document run alone (documents told by position_ids, seq_idx or the cumulative lengths cu_seq_lens_q)."""
    model, hf = pair
    torch.manual_seed(2)
    docs = [torch.randint(0, 290, (n,)) for n in (7, 1, 12, 5)]
    batch = DataCollatorWithFlattening(**collate)([{"input_ids": d.tolist()} for d in docs])
    assert ("position_ids" in batch) == (not collate) and "attention_mask" not in batch
    out = hf(**batch, output_router_logits=True)
    alone = [model(d[None]).logits[0] for d in docs]
    torch.testing.assert_close(out.logits[0], torch.cat(alone), rtol=1e-9, atol=1e-9)
    nll = torch.cat([F.cross_entropy(lg[:-1], d[1:], reduction="none") for lg, d in zip(alone, docs, strict=True)])
    torch.testing.assert_close(out.loss - model.config.router_aux_loss_coef * out.aux_loss, nll.mean())
    assert out.past_key_values is None
    with pytest.raises(ValueError, match="position_ids must have the shape of input_ids"):
        hf(batch["input_ids"], position_ids=torch.zeros(1, 3, dtype=torch.long))
    # Bounds that are not one row's cumulative lengths would split it into other documents than the collator's.
    refused = r"cu_seq_lens_q must be the cumulative document lengths \[0, ..., T=25\]"
    for bad in ([0, 7, 24], [2, 7, 25], [0, 9, 7, 25]):  # short of T, not from 0, decreasing
        with pytest.raises(ValueError, match=refused):
            hf(batch["input_ids"], cu_seq_lens_q=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"of one packed row .* for input_ids \(2, 25\)"):  # two rows, one set
        hf(batch["input_ids"].repeat(2, 1), cu_seq_lens_q=torch.tensor([0, 7, 25]))
    bounds = torch.tensor([0, 7, 8, 20, 25])
    with pytest.raises(ValueError, match="as seq_idx or as cu_seq_lens_q, not both"):
        hf(batch["input_ids"], cu_seq_lens_q=bounds, seq_idx=torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seq_lens_k must equal cu_seq_lens_q"):
        hf(batch["input_ids"], cu_seq_lens_q=bounds, cu_seq_lens_k=torch.tensor([0, 25]))
    with pytest.raises(ValueError, match=r"cu_seq_lens_q \(packed documents\), which take no past_key_values"):
        hf(batch["input_ids"], cu_seq_lens_q=bounds, past_key_values=model.new_cache(1))


def test_packed_rows_score_documents_apart_or_are_refused(pair):
    """Labels that are the inputs themselves (not the collator's) do not score a document's last token on the
    next one's first; packing with padding or with a cache is refused (it would run across documents)."""
    model, hf = pair
    docs = [torch.randint(0, 290, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 9)]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    alone = [model(d[None], labels=F.pad(d[1:], (0, 1), value=-100)[None]) for d in docs]
    want = sum(a.lm_loss * (len(d) - 1) for a, d in zip(alone, docs, strict=True)) / (len(ids[0]) - 2)
    out = hf(ids, position_ids=positions, labels=ids, output_router_logits=True)
    torch.testing.assert_close(out.loss - model.config.router_aux_loss_coef * out.aux_loss, want)
    padded, mask = F.pad(ids, (0, 2)), F.pad(torch.ones_like(ids), (0, 2))  # two pads on the right
    with pytest.raises(ValueError, match=r"packed documents\), which cannot be combined with padding"):
        hf(padded, position_ids=F.pad(positions, (0, 2), value=1), attention_mask=mask)
    with pytest.raises(ValueError, match=r"packed documents\), which take no past_key_values"):
        hf(ids, position_ids=positions, past_key_values=model.new_cache(1))


def test_forward_rejects_what_it_does_not_take(pair):
    _, hf = pair
    ids, _ = left_padded()
    with pytest.raises(ValueError, match=r"give input_ids .* or inputs_embeds .*: one of them"):
        hf(ids, inputs_embeds=torch.zeros(3, 11, 32))
    with pytest.raises(ValueError, match=r"give input_ids .* or inputs_embeds .*: one of them"):
        hf(attention_mask=torch.ones(3, 11))
    with pytest.raises(TypeError, match="MixConCache"):
        hf(ids, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match=r"MixConHFForCausalLM.forward does not take \['output_attentions', "
                                         r"'token_type_ids'\]; it takes input_ids"):
        hf(ids, output_attentions=True, token_type_ids=torch.zeros_like(ids), output_scores=False)
    with pytest.raises(ValueError, match="d_model"):
        MixConHFConfig({"d_model": 0})


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_recomputes_layers_with_the_same_gradients(pair, every):
    """Every `every`-th layer runs twice in a training step (forward, then recomputed in the backward), the
    loss and every gradient (the router's, from its load-balancing loss, too) stay those of the plain model;
    evaluation and cached generation run each layer once; disabling restores the plain layers."""
    model, hf = pair
    ids, mask = left_padded()
    names, keys = [n for n, _ in hf.named_parameters()], list(hf.state_dict())

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hf.zero_grad()
        loss = hf.train()(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in zip(names, hf.parameters(), strict=True)}

    plain_loss, plain_grads = step()
    calls = [0] * len(model.layers)
    for i, layer in enumerate(model.layers):  # counted in the layer's computation, which the recomputation reruns
        def counted(*args, i=i, forward=layer._forward):
            calls[i] += 1
            return forward(*args)
        layer._forward = counted
    modules = [name for name, _ in hf.named_modules()]
    hf.activation_checkpointing_enable(every_n_layers=every)
    assert hf.is_activation_checkpointing
    assert [layer.recompute is not None for layer in model.layers] == [i % every == 0 for i in range(len(calls))]
    assert list(hf.state_dict()) == keys and [name for name, _ in hf.named_modules()] == modules  # no wrapper

    loss, grads = step()
    assert calls == [2 if i % every == 0 else 1 for i in range(len(calls))]
    assert torch.equal(loss, plain_loss)
    router = next(n for n in names if n.endswith("router.weight"))
    assert plain_grads[router].abs().sum() > 0
    for name in names:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-12, atol=1e-14, msg=name)

    calls[:] = [0] * len(calls)
    hf.eval()
    out = hf(ids, attention_mask=mask, labels=ids)
    out.loss.backward()  # gradients on, but evaluating: no recomputation
    assert calls == [1] * len(calls)
    with torch.no_grad():
        generated = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, model.generate(ids, 5, attention_mask=mask, eos_token_id=EOS, pad_token_id=PAD))

    hf.train()
    assert hf(ids).past_key_values is None  # a cache would be advanced again by the recomputation
    with pytest.raises(ValueError, match="past_key_values"):
        hf(ids, past_key_values=model.new_cache(3))

    hf.activation_checkpointing_disable()
    assert not hf.is_activation_checkpointing
    assert all(layer.recompute is None for layer in model.layers)
    with torch.no_grad():
        assert hf(ids).past_key_values is not None


def test_activation_checkpointing_refuses_what_would_be_wrong(pair):
    _, hf = pair
    with pytest.raises(ValueError, match="use_reentrant=False"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="every_n_layers=0"):
        hf.activation_checkpointing_enable(every_n_layers=0)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resize_token_embeddings(tiny_model, tmp_path, tie, mean_resizing):
    """New rows come at the end (the old logits unchanged), both configs take the new vocab_size, the head stays
    MixCon's Linear (tied or not), and the resized model saves and loads; shrinking cuts rows at the end."""
    from mixcon.layers.linear import Linear

    model = tiny_model(tie_embeddings=tie, eos_token_id=EOS, pad_token_id=PAD, init_std=0.2)
    hf = MixConHFForCausalLM.from_mixcon(model).eval()
    ids, mask = left_padded()
    before = hf(ids, attention_mask=mask).logits
    old_head = hf.model.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match="vocab_size=300"):
        hf(torch.tensor([[305]]))

    hf.resize_token_embeddings(310, mean_resizing=mean_resizing)
    model = hf.model
    assert hf.config.vocab_size == model.config.vocab_size == 310 == hf.config.to_mixcon().vocab_size
    assert isinstance(model.lm_head, Linear) and model.lm_head.weight.shape == (310, 32)
    assert (model.lm_head.weight is model.embed.weight) == tie
    assert torch.equal(model.lm_head.weight[:300], old_head)
    new_rows = model.embed.weight[300:]
    assert torch.isfinite(new_rows).all()
    if not mean_resizing:  # drawn as the model draws its embedding: Normal(0, init_std=0.2)
        assert 0.1 < new_rows.std() < 0.4
    else:  # transformers' draw around the old rows' mean, whose entries spread ~init_std / sqrt(300)
        assert 0 < new_rows.std() < 0.1
    after = hf(ids, attention_mask=mask).logits
    assert after.shape == (3, 11, 310) and torch.equal(after[..., :300], before)
    assert hf(torch.tensor([[305]])).logits.shape == (1, 1, 310)

    hf.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.model.config.vocab_size == 310
    assert torch.equal(back(ids, attention_mask=mask).logits, after)

    hf.resize_token_embeddings(301, pad_to_multiple_of=8)  # up to 304 rows
    assert model.config.vocab_size == 304 and torch.equal(hf(ids, attention_mask=mask).logits[..., :300], before)
    with pytest.raises(ValueError, match=f"(bos|eos)_token_id={EOS} is invalid"):
        hf.resize_token_embeddings(EOS)  # the EOS id (which begins texts too) would fall outside the vocabulary
    assert model.config.vocab_size == 304


def test_tokenizer_and_text_generation_pipeline(tiny_model):
    text = "def add(a, b):\n    return a + b\n" * 20 + "class Point:\n    x: int = 0\n" * 20
    tok = train_bpe_tokenizer([text], vocab_size=300)
    htok = hf_tokenizer(tok)
    prompt = "def add(a, "
    assert htok(prompt).input_ids == [tok.eos_id, *tok.encode(prompt)]  # EOS first, as in training
    assert htok.decode(htok(prompt).input_ids, skip_special_tokens=True) == tok.decode(tok.encode(prompt))

    model = tiny_model(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    hf = MixConHFForCausalLM.from_mixcon(model).eval()
    generator = pipeline("text-generation", model=hf, tokenizer=htok)
    out = generator("class Point", max_new_tokens=8, do_sample=False, return_full_text=False)
    new = model.generate(torch.tensor([[tok.eos_id, *tok.encode("class Point")]]), 8, eos_token_id=tok.eos_id)
    assert out[0]["generated_text"] == tok.decode(new[0, 1 + len(tok.encode("class Point")):].tolist())



@pytest.mark.parametrize("source", ["bytes", "bpe"])
def test_special_token_text_encodes_as_in_transformers(source):
    """`tok.eos_token` in a text is EOS, and a special token added for fine-tuning is one id, as with any
    transformers tokenizer; split_special_tokens=True reads such text as the library reads training data."""
    tok = ByteTokenizer() if source == "bytes" else train_bpe_tokenizer(["def add(a, b): return a + b\n" * 50], 280)
    htok = hf_tokenizer(tok)
    assert htok("hi" + htok.eos_token).input_ids == [tok.eos_id, *tok.encode("hi"), tok.eos_id]
    literal = hf_tokenizer(tok, split_special_tokens=True)
    assert literal("hi<|eos|>").input_ids == [tok.eos_id, *tok.encode("hi<|eos|>")]
    htok.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    assert htok("<|user|>hi").input_ids == [tok.eos_id, tok.vocab_size, *tok.encode("hi")]


def test_byte_tokenizer_as_a_transformers_tokenizer():
    tok = ByteTokenizer()
    htok = hf_tokenizer("bytes")
    texts = ["héllo <|eos", "😀\n"]
    batch = htok(texts, padding=True).input_ids
    assert batch[0] == [tok.eos_id, *tok.encode(texts[0])]
    short = [tok.eos_id, *tok.encode(texts[1])]
    assert batch[1] == [tok.pad_id] * (len(batch[0]) - len(short)) + short  # padded on the left
    assert htok.batch_decode(batch, skip_special_tokens=True) == texts
    assert len(htok) == tok.vocab_size
    assert htok("ab", "cd").input_ids == [tok.eos_id, *tok.encode("abcd")]  # a pair: one document, as training


@pytest.fixture
def trainer_args(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (in mixcon's test extra)")
    from transformers import TrainingArguments

    def make(**options):
        return TrainingArguments(str(tmp_path / "trainer"), **{"per_device_train_batch_size": 2, **options},
                                 report_to=[], logging_steps=1, use_cpu=True, save_strategy="no")
    return make


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_trainer_logs_the_models_loss_with_gradient_accumulation(tiny_model, trainer_args, checkpointing):
    """With the learning rate at 0, every logged loss is the model's loss on (copies of) one sequence."""
    from transformers import Trainer

    model = tiny_model(dtype=torch.float32)
    ids = torch.randint(0, 290, (16,), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids, "labels": ids}] * 8
    args = trainer_args(max_steps=2, learning_rate=0.0, gradient_accumulation_steps=2,
                        activation_checkpointing=checkpointing)
    trainer = Trainer(model=MixConHFForCausalLM.from_mixcon(model), args=args, train_dataset=data)
    trainer.train()
    assert trainer.model.is_activation_checkpointing == checkpointing
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with torch.no_grad():
        expected = MixConHFForCausalLM.from_mixcon(model)(ids[None], labels=ids[None]).loss.item()
    assert logged == pytest.approx([expected] * 2, rel=1e-5)


def test_trainer_gradient_accumulation_equals_one_big_batch(tiny_model, trainer_args):
    """The Trainer passes num_items_in_batch: two micro-batches of documents of 7 and 33 tokens give the loss and
    gradient of one batch holding both (each micro-batch's mean would weight the short document's tokens 4x)."""
    from transformers import Trainer

    model = tiny_model(dtype=torch.float32, router_aux_loss_coef=0.0)
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 290, (n,), generator=generator).tolist()} for n in (7, 33)]
    logs = []
    for batch, accumulation in ((2, 1), (1, 2)):
        hf = MixConHFForCausalLM.from_mixcon(copy.deepcopy(model))
        args = trainer_args(max_steps=1, learning_rate=0.0, per_device_train_batch_size=batch,
                            gradient_accumulation_steps=accumulation)
        trainer = Trainer(model=hf, args=args, train_dataset=data, data_collator=DataCollatorWithFlattening())
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        logs.append(next(h for h in trainer.state.log_history if "loss" in h))
    assert logs[1]["loss"] == pytest.approx(logs[0]["loss"], rel=1e-5)
    assert logs[1]["grad_norm"] == pytest.approx(logs[0]["grad_norm"], rel=1e-5)


def test_trainer_with_padding_free_batches_keeps_documents_apart(tiny_model, trainer_args):
    """transformers' Trainer with DataCollatorWithFlattening: the position_ids reach the model, so the logged
    loss is that of the documents kept apart, not of one row where they see each other."""
    from transformers import Trainer

    hf = MixConHFForCausalLM.from_mixcon(tiny_model(dtype=torch.float32))
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 290, (n,), generator=generator).tolist()} for n in (9, 14)]
    collator = DataCollatorWithFlattening()
    trainer = Trainer(model=hf, args=trainer_args(max_steps=1, learning_rate=0.0), train_dataset=data,
                      data_collator=collator)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    batch = collator(data)
    with torch.no_grad():
        apart = hf(**batch, output_router_logits=True).loss.item()  # the training loss: router losses counted
        together = hf(batch["input_ids"], labels=batch["labels"], output_router_logits=True).loss.item()
    assert logged == pytest.approx([apart], rel=1e-5) and apart != pytest.approx(together, rel=1e-3)


def test_trainer_trains_and_saves_a_loadable_model(tiny_model, trainer_args, tmp_path):
    from transformers import Trainer

    ids = torch.randint(0, 290, (16,), generator=torch.Generator().manual_seed(0))
    hf = MixConHFForCausalLM.from_mixcon(tiny_model(dtype=torch.float32))
    trainer = Trainer(model=hf, args=trainer_args(max_steps=8, learning_rate=1e-2),
                      train_dataset=[{"input_ids": ids, "labels": ids}] * 8)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged[-1] < logged[0] - 0.5
    trainer.save_model(str(tmp_path / "trained"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "trained").eval()
    assert torch.equal(back(ids[None]).logits, hf.eval()(ids[None]).logits)
    mixcon = MixConForCausalLM.from_pretrained(tmp_path / "trained").eval()  # and back in this library
    assert torch.equal(mixcon(ids[None]).logits, hf(ids[None]).logits)


@pytest.mark.parametrize("tie", [True, False])
def test_mixcon_loads_what_the_wrapper_saved(tiny_model, tmp_path, tie):
    hf = MixConHFForCausalLM.from_mixcon(tiny_model(dtype=torch.float32, tie_embeddings=tie)).eval()
    hf.save_pretrained(tmp_path)
    model = MixConForCausalLM.from_pretrained(tmp_path).eval()
    assert model.config == hf.model.config and (model.lm_head.weight is model.embed.weight) == tie
    ids, mask = left_padded()
    assert torch.equal(model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits)


@pytest.fixture
def run_dir(tmp_path, tiny_model):
    """A run of this library with a BPE tokenizer: its model (fp32) and tokenizer, and the run directory."""
    text = "def add(a, b):\n    return a + b\n" * 20 + "class Point:\n    x: int = 0\n" * 20
    tok = train_bpe_tokenizer([text], vocab_size=300)
    model = tiny_model(dtype=torch.float32, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: once, as training saves
    save_checkpoint(tmp_path / "run", 5, config=model.config, model_state=state, optimizer_state={}, trainer_state={},
                    tokenizer=tok)
    return model, tok, tmp_path / "run"


def test_hf_tokenizer_of_a_run_or_a_checkpoint_is_its_models(run_dir, tmp_path, tiny_model):
    """A run directory (a bytes or given tokenizer leaves no RUN/tokenizer/), one of its checkpoints: the
    tokenizer its model was trained with; a saved model without one: an error saying so."""
    _, tok, run = run_dir
    for source in (run, latest_checkpoint(run), str(run)):
        assert hf_tokenizer(source)("class Point").input_ids == [tok.eos_id, *tok.encode("class Point")]
    tiny_model().save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match=r"plain has no tokenizer/ nor tokenizer\.json"):
        hf_tokenizer(tmp_path / "plain")


def test_export_hf_loads_through_the_auto_classes_and_back(run_dir, tmp_path):
    from transformers import AutoTokenizer

    model, tok, run = run_dir
    out = export_hf(run, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                    "model.safetensors", "modeling_mixcon.py", "tokenizer.json",
                                                    "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    htok = AutoTokenizer.from_pretrained(out)
    prompts = ["class Point", "def add(a, "]
    batch = htok(prompts, return_tensors="pt", padding=True)
    assert htok.padding_side == "left" and batch.input_ids[1].tolist() == [tok.eos_id, *tok.encode(prompts[1])]
    assert htok("a" + htok.eos_token).input_ids == [tok.eos_id, *tok.encode("a"), tok.eos_id]  # as transformers'
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    # What begins a text, everywhere a tool may look for it: EOS, as in training (a tool that prepends
    # bos_token would otherwise feed <|bos|>, which training never saw).
    assert htok.bos_token_id == hf.config.bos_token_id == hf.generation_config.bos_token_id == tok.eos_id
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == tok.eos_id
    expected = model.generate(batch.input_ids, 6, attention_mask=batch.attention_mask, eos_token_id=tok.eos_id,
                              pad_token_id=tok.pad_id)
    assert torch.equal(hf.generate(**batch, max_new_tokens=6, do_sample=False), expected)
    again, again_tok = load_model_and_tokenizer(out)  # `mixcon generate` / `eval` read the export
    assert torch.equal(again(batch.input_ids).logits, model(batch.input_ids).logits)
    assert again_tok.encode(prompts[1]) == tok.encode(prompts[1])


def test_export_hf_model_card_has_hub_metadata_and_code_that_runs(run_dir, tmp_path, capsys):
    model, tok, run = run_dir
    out = export_hf(run, tmp_path / "exported 'model'")  # a path that needs quoting in the card's code
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mixcon\npipeline_tag: text-generation\n")
    assert model.summary().splitlines()[-1] in card and str(run) in card
    code = card.split("```python\n")[1].split("```")[0]
    exec(code, {})
    expected = model.generate(torch.tensor([[tok.eos_id, *tok.encode("def ")]]), 20, eos_token_id=tok.eos_id)
    assert capsys.readouterr().out.strip() == str([tok.decode(expected[0].tolist())])


def test_export_hf_loads_with_remote_code_where_mixcon_is_not_imported(run_dir, tmp_path):
    """A fresh interpreter that imports only transformers: trust_remote_code=True loads the export through its
    modeling_mixcon.py, and without it transformers refuses rather than guessing."""
    model, tok, run = run_dir
    out = export_hf(run, tmp_path / "hf")
    ids = [tok.eos_id, *tok.encode("class Point")]
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    AutoModelForCausalLM.from_pretrained({str(out)!r})
    sys.exit("loaded without trust_remote_code")
except ValueError as e:
    assert "trust_remote_code" in str(e), e
assert "mixcon" not in sys.modules
print("trusted from here", flush=True)
tokenizer = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
assert tokenizer("class Point").input_ids == {ids}
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
assert type(model).__module__ == "mixcon.integrations.transformers"
torch.save(model(torch.tensor([{ids}])).logits, {str(tmp_path / "logits.pt")!r})
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Do you wish to run the custom code" not in done.stdout.split("trusted from here")[1]  # no prompt
    assert torch.equal(torch.load(tmp_path / "logits.pt"), model(torch.tensor([ids])).logits)


def test_a_sharded_export_loads_everywhere(run_dir, tmp_path):
    model, tok, run = run_dir
    out = export_hf(run, tmp_path / "hf", max_shard_size="100KB")  # a ~0.8 MB model in shards
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    ids = torch.tensor([[tok.eos_id, *tok.encode("class Point")]])
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, model(ids).logits)
    assert torch.equal(MixConForCausalLM.from_pretrained(out).eval()(ids).logits, model(ids).logits)
    assert torch.equal(load_model_and_tokenizer(out)[0](ids).logits, model(ids).logits)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=f"names shards that are missing: .*{shards[1].name}"):
        MixConForCausalLM.from_pretrained(out)


def test_export_hf_takes_the_tokenizers_special_ids_where_the_model_has_none(tiny_model, tmp_path):
    """A model built by hand without EOS / padding ids, exported with the byte tokenizer: the export's ids
    are the tokenizer's (transformers' generate stops at its EOS); ids naming other tokens are refused."""
    tok = ByteTokenizer()
    tiny_model(dtype=torch.float32).save_pretrained(tmp_path / "model")
    out = export_hf(tmp_path / "model", tmp_path / "hf", tokenizer="bytes")
    written = json.loads((out / "config.json").read_text())
    assert (written["eos_token_id"], written["pad_token_id"]) == (tok.eos_id, tok.pad_id)
    assert written["bos_token_id"] == written["mixcon"]["bos_token_id"] == tok.eos_id  # what begins a text
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id
    assert MixConForCausalLM.from_pretrained(out).config.eos_token_id == tok.eos_id
    tiny_model(dtype=torch.float32, eos_token_id=EOS).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=rf"the model's eos_token_id={EOS} is not the tokenizer's eos_id="
                                         rf"{tok.eos_id} \(bytes\)"):
        export_hf(tmp_path / "other", tmp_path / "hf2", tokenizer="bytes")
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("size", ["abc", "1.5GB", "-5GB", 0, None, True])
def test_export_hf_refuses_a_bad_shard_size_before_reading(tmp_path, size):
    with pytest.raises(ValueError, match=r"\(--max-shard-size\) must be a positive number of bytes.*e\.g\. 5GB"):
        export_hf(tmp_path / "no-such-run", tmp_path / "hf", max_shard_size=size)  # the run is never looked at
    assert not (tmp_path / "hf").exists()


def test_an_export_through_a_symbolic_link_writes_its_target_and_keeps_the_link(run_dir, tmp_path):
    _, _, run = run_dir
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for _ in range(2):  # again, over the first
        export_hf(run, tmp_path / "link", overwrite=True)
        assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "run", "target"]
    (tmp_path / "dangling").symlink_to(tmp_path / "elsewhere")
    export_hf(run, tmp_path / "dangling")
    assert (tmp_path / "elsewhere" / "config.json").is_file()


def test_an_export_a_crash_left_swapped_out_is_put_back_by_its_readers(run_dir, tmp_path):
    """A kill between publish_directory's two renames leaves the previous export only under .tmp-old-OUT: the
    next reader of OUT puts it back."""
    _, _, run = run_dir
    out = export_hf(run, tmp_path / "hf")
    out.rename(tmp_path / ".tmp-old-hf")
    model, _ = load_model_and_tokenizer(out)
    assert out.is_dir() and not (tmp_path / ".tmp-old-hf").exists() and isinstance(model, MixConForCausalLM)


def test_a_failed_export_leaves_the_previous_one(run_dir, tmp_path, monkeypatch):
    _, _, run = run_dir
    out = export_hf(run, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("mixcon.integrations.transformers.model_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_hf(run, out, dtype=torch.bfloat16, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # what a killed export left in its temporary folder is not published by the next one
    monkeypatch.undo()
    (tmp_path / ".tmp-hf").mkdir()
    (tmp_path / ".tmp-hf" / "chat_template.jinja").write_text("{{ stale }}")
    out = export_hf(run, out, overwrite=True)
    assert not (out / "chat_template.jinja").exists() and set(before) == {p.name for p in out.iterdir()}


def test_a_second_export_to_the_same_folder_is_refused_while_the_first_writes(run_dir, tmp_path, monkeypatch):
    """Two exports to one --out shared its temporary folder, each deleting the other's files; now the second is
    refused (naming the first's process) and nothing of it stays behind."""
    from mixcon.io import locked_directory

    _, _, run = run_dir
    before = sorted(p.name for p in tmp_path.iterdir())

    def busy(pid: str) -> None:
        raise AssertionError("not held yet")

    refused = rf"hf is being written by another export \(pid {os.getpid()}\)"
    with locked_directory(tmp_path / ".lock-hf", busy), pytest.raises(ValueError, match=refused):
        export_hf(run, tmp_path / "hf")  # (the lock held: the first export, mid-write)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / ".lock-hf").mkdir()
    (tmp_path / ".lock-hf" / ".lock").write_text("999999\n")  # a crashed export's lock: cleaned up by the next
    export_hf(run, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "hf"])
    monkeypatch.setitem(sys.modules, "fcntl", None)  # an OS without fcntl (Windows): no lock, and no trace of it
    export_hf(run, tmp_path / "hf", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "hf"])


def test_export_hf_refuses_to_write_over_what_it_reads_or_over_a_file(run_dir, tmp_path):
    _, _, run = run_dir
    checkpoint = run / "checkpoints" / "step-00000005"
    (tmp_path / "alias").symlink_to(checkpoint)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = [p.read_bytes() for p in files]
    for source, out, where in [(run, checkpoint, "is"), (run, tmp_path / "alias", "is"), (run, run, "holds"),
                               (run, run / "checkpoints", "holds"), (checkpoint, run, "holds"),
                               (checkpoint, checkpoint / "tokenizer", "is inside"), (run, run / "hf", "is inside")]:
        with pytest.raises(ValueError, match=rf"\(--out\) {where} .*, which the export reads: writing there would"):
            export_hf(source, out, overwrite=True)
    (tmp_path / "somefile.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"somefile.txt' \(--out\) exists and is not a directory"):
        export_hf(run, tmp_path / "somefile.txt", overwrite=True)
    assert [p.read_bytes() for p in files] == before and (tmp_path / "somefile.txt").read_text() == "mine"
    assert not (run / "hf").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_hf_in_bf16_and_over_an_existing_directory(run_dir, tmp_path):
    model, tok, run = run_dir
    (tmp_path / "hf").mkdir()  # empty: fine
    export_hf(run, tmp_path / "hf")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_hf(run, tmp_path / "hf", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="tokenizer 'bytes' is not the one this model was trained with"):
        export_hf(run, tmp_path / "hf", tokenizer="bytes", dtype=torch.bfloat16, overwrite=True)
    tok.save(tmp_path / "copy")  # the run's tokenizer in another file: taken
    out = export_hf(run, tmp_path / "hf", tokenizer=tmp_path / "copy", dtype=torch.bfloat16, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    back, back_tok = load_model_and_tokenizer(out)
    assert mismatch(tok, back_tok) is None
    ids = torch.randint(0, tok.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    assert back.embed.weight.dtype == torch.bfloat16  # loaded in the dtype it was saved in
    assert torch.equal(back(ids).logits, model.to(torch.bfloat16)(ids).logits)



def test_use_cache_true_returns_a_cache_while_autograd_records(pair):
    """use_cache=True makes a cache in a forward that autograd records, with labels too (as transformers'
    models do), and continuing from it gives the full forward's logits and gradients; it is refused, not
    silently dropped, where no cache can be made."""
    _, hf = pair
    ids, mask = left_padded()
    full = hf(ids, attention_mask=mask)
    assert full.past_key_values is None  # by default none while autograd records
    first = hf(ids[:, :7], attention_mask=mask[:, :7], labels=ids[:, :7], use_cache=True)
    assert isinstance(first.past_key_values, MixConCache)
    rest = hf(ids[:, 7:], attention_mask=mask, past_key_values=first.past_key_values)
    torch.testing.assert_close(rest.logits, full.logits[:, 7:])
    rest.logits.sum().backward()
    assert hf.model.embed.weight.grad is not None
    with pytest.raises(ValueError, match=r"use_cache=True: no cache is made for rows that end in padding"):
        hf(ids, attention_mask=mask.flip(1), use_cache=True)
    with pytest.raises(ValueError, match=r"use_cache=True: no cache is made for packed documents"):
        hf(ids, seq_idx=torch.zeros_like(ids).index_fill(1, torch.tensor([6, 7, 8, 9, 10]), 1), use_cache=True)
    assert hf(ids, attention_mask=mask.flip(1)).past_key_values is None  # by default: none, no error


def test_weights_missing_from_the_files_get_mixcons_initialisation(pair, tmp_path):
    """transformers makes parameters the files lack without values; they get MixCon's initialisation (norm
    weights 1, Normal(0, init_std) projections), and the loaded ones of the same module stay as saved."""
    from safetensors.torch import load_file, save_file

    model, hf = pair
    hf.save_pretrained(tmp_path / "saved")
    untied = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", tie_word_embeddings=False)
    head = untied.model.lm_head.weight
    assert head.data_ptr() != untied.model.embed.weight.data_ptr() and torch.isfinite(head).all()
    assert abs(head.std().item() - model.config.init_std) < 0.2 * model.config.init_std
    weights = load_file(tmp_path / "saved" / "model.safetensors")
    gone = ["model.norm.weight", "model.layers.0.mixer.A_log", "model.layers.1.mixer.conv1d.weight"]
    save_file({k: v for k, v in weights.items() if k not in gone}, tmp_path / "saved" / "model.safetensors",
              metadata={"format": "pt"})
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(gone)
    assert torch.equal(back.model.norm.weight, torch.ones_like(back.model.norm.weight))
    A = -back.model.layers[0].mixer.A_log.exp()
    assert bool(((A <= -1) & (A >= -16)).all())  # A ~ U[1, 16]
    conv = back.model.layers[1].mixer.conv1d.weight
    assert torch.isfinite(conv).all() and conv.abs().max() <= 1 / conv.shape[-1] ** 0.5  # PyTorch's conv init
    for name in ["model.layers.0.mixer.D", "model.layers.1.mixer.conv1d.bias", "model.embed.weight"]:
        assert torch.equal(back.get_parameter(name).to(weights[name].dtype), weights[name])


def test_native_config_fields_read_and_set_through_the_transformers_config(pair, tmp_path):
    """Every MixConConfig field is an attribute of the transformers config, so transformers' from_pretrained
    keywords set them (the README's conba_kernel="triton" for a GPU); top_k is num_experts_per_tok there (a
    config attribute named top_k would be a generation parameter)."""
    from transformers import AutoConfig

    _, hf = pair
    hf.save_pretrained(tmp_path / "saved")
    config = AutoConfig.from_pretrained(tmp_path / "saved", conba_chunk=16, conba_kernel="triton")
    assert config.conba_chunk == 16 and config.to_mixcon().conba_kernel == "triton"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", conba_chunk=16)
    assert loaded.model.config.conba_chunk == 16
    # fields set together, in any order (the saved chunk, 8, does not fit the Triton kernel; 16 does)
    assert hf.config.conba_chunk == 8
    config = AutoConfig.from_pretrained(tmp_path / "saved", conba_kernel="triton", hidden_size=32, conba_chunk=16)
    assert (config.conba_kernel, config.conba_chunk, config.d_model) == ("triton", 16, 32)
    both = {"d_model": 32, **config.to_dict()}  # a hand-written config.json naming d_model twice
    assert type(config).from_dict(both, d_model=48).d_model == 48  # the keyword wins over either name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", conba_kernel="triton", conba_chunk=16)
    assert (loaded.model.config.conba_kernel, loaded.model.config.conba_chunk) == ("triton", 16)
    config.conba_delay = 0
    assert config.to_mixcon().conba_delay == 0 and config.to_dict()["mixcon"]["conba_delay"] == 0
    with pytest.raises(ValueError, match="conba_chunk"):
        config.conba_chunk = 0
    assert config.num_experts_per_tok == hf.model.config.top_k and not hasattr(config, "top_k")


def test_a_loaded_model_saved_again_loads_with_remote_code(pair, tmp_path):
    """save_pretrained of any wrapper (one this process built, or one loaded through remote code) writes the
    modeling_mixcon.py that config.json's auto_map names, and no copy of this module: the directory loads in a
    fresh interpreter with trust_remote_code=True, and saved from there, again."""
    from mixcon.integrations.transformers import AUTO_MAP

    _, hf = pair
    hf.save_pretrained(tmp_path / "first")
    assert json.loads((tmp_path / "first" / "config.json").read_text())["auto_map"] == AUTO_MAP
    ids = [[EOS, 5, 6, 7]]
    script = f"""
import json, os, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "first")!r}, trust_remote_code=True)
model.save_pretrained({str(tmp_path / "second")!r})
assert sorted(os.listdir({str(tmp_path / "second")!r})) == ["config.json", "generation_config.json",
    "model.safetensors", "modeling_mixcon.py"], os.listdir({str(tmp_path / "second")!r})
assert json.load(open({str(tmp_path / "second" / "config.json")!r}))["auto_map"] == {AUTO_MAP!r}
"""
    load = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "second")!r}, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(torch.tensor({ids})).logits, {str(tmp_path / "logits.pt")!r})
"""
    for code in (script, load):
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), hf(torch.tensor(ids)).logits)


def test_tie_embeddings_and_tie_word_embeddings_are_one_setting(pair, tmp_path):
    """The native name and transformers' name of the same field stay in step, through a save too: a model
    built from the config is untied by either."""
    from transformers import AutoConfig

    _, hf = pair
    config = MixConHFConfig(hf.model.config)
    config.tie_embeddings = False
    assert config.tie_word_embeddings is False and config.to_mixcon().tie_embeddings is False
    config.save_pretrained(tmp_path / "c")
    back = AutoConfig.from_pretrained(tmp_path / "c")
    assert back.tie_word_embeddings is False and back.to_mixcon().tie_embeddings is False
    model = MixConHFForCausalLM(back)
    assert model.model.lm_head.weight.data_ptr() != model.model.embed.weight.data_ptr()
    hf.save_pretrained(tmp_path / "m")
    untied = AutoModelForCausalLM.from_pretrained(tmp_path / "m", tie_embeddings=False)
    assert untied.model.lm_head.weight.data_ptr() != untied.model.embed.weight.data_ptr()


def test_a_tied_embedding_missing_from_the_files_is_initialised_not_left_on_meta(pair, tmp_path):
    """transformers does not count a tied weight as missing; it would stay a meta tensor."""
    from safetensors.torch import load_file, save_file

    model, hf = pair
    hf.save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "model.embed.weight"}, tmp_path / "m" / "model.safetensors",
              metadata={"format": "pt"})
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    embed = back.model.embed.weight
    assert not embed.is_meta and back.model.lm_head.weight is embed and torch.isfinite(embed).all()
    assert abs(embed.std().item() - model.config.init_std) < 0.2 * model.config.init_std
    assert torch.isfinite(back(torch.tensor([[EOS, 5, 6]])).logits).all()


def test_every_save_of_the_config_writes_the_remote_code_it_names(pair, tmp_path, monkeypatch):
    """Also config.save_pretrained(push_to_hub=True), which uploads what changed while it saved."""
    from transformers import PretrainedConfig

    _, hf = pair
    uploaded: list[str] = []

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        uploaded.extend(sorted(p.name for p in Path(working_dir).iterdir()
                               if p.name not in files_timestamps or p.stat().st_mtime > files_timestamps[p.name]))

    class Api:  # the Hub, as far as save_pretrained(push_to_hub=True) uses it
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})

    monkeypatch.setattr(PretrainedConfig, "_upload_modified_files", upload)
    monkeypatch.setattr("transformers.configuration_utils.hf_api", Api)
    hf.config.save_pretrained(str(tmp_path / "c"), push_to_hub=True, repo_id="me/model")
    assert uploaded == ["config.json", "modeling_mixcon.py"]


def test_hf_tokenizer_of_a_tokenizer_directory_or_file_is_that_tokenizer(run_dir, tmp_path, monkeypatch):
    """A folder holding tokenizer.json (a run's tokenizer/) and the tokenizer.json itself are read as tokenizers,
    not as model directories; 'bytes' is the byte tokenizer even beside a folder of that name (a run 'bytes')."""
    _, tok, _ = run_dir
    saved = tok.save(tmp_path / "tok")
    for source in (tmp_path / "tok", str(tmp_path / "tok"), saved, str(saved)):
        assert hf_tokenizer(source)("class Point").input_ids == [tok.eos_id, *tok.encode("class Point")]
    (tmp_path / "bytes").mkdir()
    monkeypatch.chdir(tmp_path)
    assert hf_tokenizer("bytes")("hi").input_ids == [ByteTokenizer().eos_id, *ByteTokenizer().encode("hi")]
    with pytest.raises(FileNotFoundError, match="nothing-here"):  # neither a tokenizer nor a model directory
        hf_tokenizer(tmp_path / "nothing-here")


def test_a_new_linear_map_with_a_bias_starts_as_the_model_starts_its_head(pair):
    """A linear map transformers makes anew (not yet the model's): weight ~ Normal(0, init_std), bias zero."""
    _, hf = pair
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300).double()
    torch.nn.init.ones_(head.bias)
    hf._init_weights(head)
    assert torch.equal(head.bias, torch.zeros(300, dtype=torch.float64))
    std = hf.config.to_mixcon().init_std
    assert abs(float(head.weight.detach().std()) - std) < 0.1 * std


def test_a_save_off_the_main_process_leaves_the_directory_as_it_was(pair, tmp_path):
    """save_pretrained(is_main_process=False) (each process of a distributed run calls it): neither the mark of an
    unfinished save nor an earlier save's weights are removed by a process that saved nothing there."""
    from mixcon.models.files import INCOMPLETE_NAME

    _, hf = pair
    hf.save_pretrained(tmp_path)
    (tmp_path / INCOMPLETE_NAME).write_text("")
    before = sorted(p.name for p in tmp_path.iterdir())
    hf.save_pretrained(tmp_path, is_main_process=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and INCOMPLETE_NAME in before
