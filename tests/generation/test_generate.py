"""Generation: batched left-padded prompts equal each prompt alone; sampling controls; EOS."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch

from mixcon.generation.generate import filter_logits, penalize_repeats, sample_next


def left_pad(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("layout", [{}, dict(attn_per_block=0), dict(attn_per_block=4, attn_rope=True)])
def test_batched_greedy_equals_each_prompt_alone(layout, tiny_model):
    model = tiny_model(**layout)
    prompts = [torch.randint(3, 300, (n,)) for n in (3, 11, 7)]
    ids, mask = left_pad(prompts, pad=5)
    batched = model.generate(ids, 12, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], 12)
        assert torch.equal(batched[i, ids.shape[1]:], alone[0, len(p):]), i


def test_padding_value_does_not_matter(tiny_model):
    model = tiny_model()
    prompts = [torch.randint(3, 300, (n,)) for n in (2, 9)]
    ids0, mask = left_pad(prompts, pad=0)
    ids1, _ = left_pad(prompts, pad=299)
    with torch.no_grad():
        a = model(ids0, attention_mask=mask).logits
        b = model(ids1, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=1e-12, atol=1e-12)


def test_sampling_is_seeded_and_respects_top_k(tiny_model):
    model = tiny_model(dtype=torch.float32)
    prompt = torch.randint(0, 300, (2, 5))
    a = model.generate(prompt, 10, do_sample=True, temperature=1.5, seed=7)
    b = model.generate(prompt, 10, do_sample=True, temperature=1.5, seed=7)
    c = model.generate(prompt, 10, do_sample=True, temperature=1.5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        tok = sample_next(logits, do_sample=True, temperature=1.0, top_k=3, top_p=None, generator=g)
        top3 = logits.topk(3, dim=-1).indices
        assert bool((top3 == tok[:, None]).any(-1).all())


def test_transformers_spellings_of_the_length_and_of_no_top_k(tiny_model):
    """max_length counts the prompt (max_new_tokens wins when both are given, with a warning as in transformers,
    and a max_length the prompt fills warns that nothing is generated); top_k=0 filters nothing."""
    model = tiny_model(dtype=torch.float32)
    prompt = torch.randint(0, 300, (2, 5))
    assert torch.equal(model.generate(prompt, max_length=12), model.generate(prompt, 7))
    with pytest.warns(UserWarning, match=r"max_length=3 leaves no room after the prompt's 5 tokens") as caught:
        assert model.generate(prompt, max_length=3).shape == (2, 5)
    assert caught[0].filename == __file__  # the caller's line
    with pytest.warns(UserWarning, match="max_new_tokens=4 and max_length=100 both given: max_new_tokens wins"):
        assert torch.equal(model.generate(prompt, 4, max_length=100), model.generate(prompt, 4))
    sampled = dict(do_sample=True, temperature=2.0, seed=3)
    assert torch.equal(model.generate(prompt, 12, top_k=0, **sampled), model.generate(prompt, 12, **sampled))


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[5.0, 4.0, -5.0, -6.0]])  # p ≈ 0.73, 0.27, tiny, tiny
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, do_sample=True, temperature=1.0, top_k=None, top_p=0.9, generator=g))
            for _ in range(200)}
    assert seen == {0, 1}
    assert int(sample_next(logits, do_sample=True, temperature=1.0, top_k=None, top_p=0.5, generator=g)) == 0


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, None, 0.5, None), (1.0, None, 0.75, None), (0.7, 3, 0.9, None), (1.3, 2, None, None),
    (1.0, 60, 0.3, None), (1.0, None, 1.0, None),
    (1.0, 49, None, None),  # V - 1: one logit masked
    (1.0, None, None, 0.1), (0.5, None, None, 0.3), (0.7, 10, 0.9, 0.2), (1.3, None, 0.95, 0.05),
    (1.0, None, None, 1.0),
])
def test_filtering_equals_transformers_warpers(temperature, top_k, top_p, min_p):
    """The kept tokens and their logits equal those of transformers' temperature, top-k, top-p and min-p warpers,
    in their order; at the top-p boundary too, where rows of tied logits reach the mass exactly (uniform over 4:
    0.5 after 2 tokens; which of the tied tokens stay is arbitrary, so only how many is compared there)."""
    warpers = pytest.importorskip("transformers.generation.logits_process")
    chain = [warpers.TemperatureLogitsWarper(temperature)]
    chain += [warpers.TopKLogitsWarper(top_k)] if top_k else []
    chain += [warpers.TopPLogitsWarper(top_p)] if top_p is not None and top_p < 1 else []
    chain += [warpers.MinPLogitsWarper(min_p)] if min_p else []

    def warped(logits: torch.Tensor) -> torch.Tensor:
        for warp in chain:
            logits = warp(None, logits)
        return logits

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))  # no ties
    got, want = filter_logits(logits, temperature, top_k, top_p, min_p), warped(logits.clone())
    assert torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got[got.isfinite()], want[want.isfinite()])
    if min_p:
        assert got.isinf().any() and got.isfinite().any(-1).all()  # min-p dropped some, never a row's likeliest
    tied = torch.tensor([[0.25] * 4, [0.5, 0.25, 0.125, 0.125], [0.5, 0.5, 0.0, 0.0]]).log()
    assert torch.equal(filter_logits(tied, temperature, top_k, top_p, min_p).isfinite().sum(-1),
                       warped(tied.clone()).isfinite().sum(-1))


def test_min_p_samples_only_tokens_that_likely():
    """Probabilities 0.5, 0.3, 0.15, 0.05: min_p = 0.5 keeps the tokens of >= 0.25 (ids 0 and 1), 0.2 also id 2."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    g = torch.Generator().manual_seed(0)
    for min_p, kept in ((0.5, {0, 1}), (0.2, {0, 1, 2})):
        seen = {int(sample_next(logits, do_sample=True, temperature=1.0, top_k=None, top_p=None, generator=g,
                                min_p=min_p)) for _ in range(300)}
        assert seen == kept


def test_repetition_penalty_equals_transformers_processor():
    """penalize_repeats over the tokens a row holds == transformers' RepetitionPenaltyLogitsProcessor on the
    row (a token that occurs twice is penalised once), for penalties above and below 1."""
    processors = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (4, 15), generator=g)
    logits = 3 * torch.randn(4, 50, generator=g)  # both signs
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (1.3, 0.7, 4.0):
        want = processors.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        assert torch.equal(penalize_repeats(logits, seen, penalty), want)


def test_eos_stops_and_pads(tiny_model):
    model = tiny_model(dtype=torch.float32)
    prompt = torch.randint(0, 300, (1, 4))
    free = model.generate(prompt, 6)
    eos = int(free[0, 5])  # the second generated token
    stopped = model.generate(prompt, 6, eos_token_id=eos)
    assert stopped.shape[1] <= 4 + 2 and int(stopped[0, -1]) == eos
    streamed = []
    model.generate(prompt, 6, streamer=lambda t: streamed.append(int(t[0])))
    assert streamed == free[0, 4:].tolist()


def test_stopping_criteria_end_rows_as_eos_does(tiny_model):
    """A row the criteria call done is padded from its next token on, the others go on as alone; generation ends
    when every row is done. transformers' StoppingCriteria objects fit."""
    from transformers import MaxLengthCriteria

    model = tiny_model(dtype=torch.float32, eos_token_id=299, pad_token_id=298)
    prompt = torch.randint(0, 290, (2, 4))
    free = model.generate(prompt, 8)
    seen = []

    def row0_after_three(sequences: torch.Tensor, scores: None) -> torch.Tensor:
        seen.append(sequences.shape[1])
        return torch.tensor([sequences.shape[1] >= 4 + 3, False])

    got = model.generate(prompt, 8, stopping_criteria=row0_after_three)
    assert seen == list(range(5, 13))  # called after every step with the sequences so far
    assert torch.equal(got[1], free[1]) and torch.equal(got[0, :7], free[0, :7]) and got[0, 7:].eq(298).all()
    assert model.generate(prompt, 8, stopping_criteria=MaxLengthCriteria(max_length=7)).shape == (2, 7)
    for shape in ((2, 1), (3,)):
        with pytest.raises(ValueError, match=rf"stopping_criteria must return one bool or a \(B,\) = \(2,\) bool "
                                             rf"tensor of the rows that are done, got shape {re.escape(str(shape))}"):
            model.generate(prompt, 3, stopping_criteria=lambda ids, scores, shape=shape: torch.zeros(shape))
    with pytest.raises(ValueError, match="stopping_criteria: rows that stop are continued with pad_token_id"):
        tiny_model(eos_token_id=None, pad_token_id=None).generate(prompt, 3, stopping_criteria=row0_after_three)


def test_finished_rows_are_padded_with_the_configs_pad_id(tiny_model):
    model = tiny_model(dtype=torch.float32, pad_token_id=7)
    prompts = torch.tensor([[5, 6, 8, 9], [11, 12, 13, 14]])
    free = model.generate(prompts, 6)
    row0, row1 = free[0, 4:].tolist(), free[1, 4:].tolist()
    eos = next(t for t in row0[:-1] if t not in row1)  # ends row 0 before its last token; row 1 never makes it
    stop = row0.index(eos) + 1
    out = model.generate(prompts, 6, eos_token_id=eos)
    assert out[0, 4:].tolist() == [*row0[:stop], *[7] * (6 - stop)]  # as transformers' generate pads
    assert model.generate(prompts, 6, eos_token_id=eos, pad_token_id=3)[0, 4 + stop:].tolist() == [3] * (6 - stop)
    assert torch.equal(model.generate(prompts, 6, eos_token_id=[299, eos]), out)  # any of several EOS ids
    no_pad = tiny_model(dtype=torch.float32)  # no pad id anywhere: the (first) EOS id pads, as transformers does
    assert no_pad.config.pad_token_id is None and torch.equal(no_pad.generate(prompts, 6), free)
    assert no_pad.generate(prompts, 6, eos_token_id=[eos, 299])[0, 4:].tolist() == [*row0[:stop], *[eos] * (6 - stop)]


def test_transformers_streamers_get_the_prompt_the_tokens_and_the_end(tiny_model):
    transformers = pytest.importorskip("transformers")
    from mixcon.integrations.transformers import hf_tokenizer

    model = tiny_model(dtype=torch.float32, vocab_size=260)  # the bytes tokenizer's ids fit
    tok = hf_tokenizer("bytes")
    prompt = torch.tensor([tok("the king")["input_ids"]])
    out = model.generate(prompt, 6)
    streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True, timeout=5)  # raises if end() is missing
    model.generate(prompt, 6, streamer=streamer)
    assert "".join(streamer) == tok.decode(out[0, prompt.shape[1]:])  # the iterator ended: end() was called

    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.calls.append("end")

    recorder = Recorder()
    model.generate(prompt, 6, streamer=recorder)
    assert recorder.calls == [prompt.tolist(), *[[t] for t in out[0, prompt.shape[1]:].tolist()], "end"]
    recorder = Recorder()  # nothing to generate: the prompt, then end() (a TextIteratorStreamer's reader waits for it)
    assert torch.equal(model.generate(prompt, 0, streamer=recorder), prompt)
    assert recorder.calls == [prompt.tolist(), "end"]
    with pytest.raises(TypeError, match="streamer must be called with each step's tokens, or be a transformers"):
        model.generate(prompt, 2, streamer=object())


def greedy_with_penalty(model, prompt: torch.Tensor, n: int, penalty: float) -> list[int]:
    """A reference: greedy decoding by a full forward per token (no cache), the logits of every token in the
    sequence so far divided by the penalty where positive, multiplied where negative."""
    ids = prompt.tolist()
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        held = torch.zeros_like(logits, dtype=torch.bool)
        held[ids] = True
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        ids.append(int(torch.where(held, penalized, logits).argmax()))
    return ids[len(prompt):]


def test_repetition_penalty_counts_the_prompt_and_the_new_tokens(tiny_model):
    """Greedy with repetition_penalty equals the reference loop per prompt, batched with left padding too: pads
    do not count as tokens of the row, though their id is the one the row picks first (were they penalised, it
    would not be); a penalty of 1 is none."""
    model = tiny_model(dtype=torch.float32)
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 12)]
    want = [greedy_with_penalty(model, p, 10, 2.5) for p in prompts]
    assert want[0] != model.generate(prompts[0], 10)[0, 5:].tolist()  # the penalty changes what is chosen
    for p, w in zip(prompts, want, strict=True):
        assert model.generate(p, 10, repetition_penalty=2.5)[0, len(p):].tolist() == w
    assert want[0][0] not in prompts[0].tolist()
    ids, mask = left_pad(prompts, pad=want[0][0])  # the short row's pads hold its first choice
    batched = model.generate(ids, 10, attention_mask=mask, repetition_penalty=2.5)
    assert batched[:, 12:].tolist() == want
    assert torch.equal(model.generate(ids, 10, attention_mask=mask, repetition_penalty=1.0),
                       model.generate(ids, 10, attention_mask=mask))
    # a prompt id at or above vocab_limit is one the penalty need not touch (it is never chosen)
    limited = model.generate(torch.tensor([299, 3, 4]), 6, vocab_limit=200, repetition_penalty=2.5)
    assert int(limited[0, 3:].max()) < 200


def test_generate_validates_arguments(tiny_model):
    model = tiny_model(dtype=torch.float32)
    prompt = torch.randint(0, 300, (2, 4))
    for bad in (0, float("nan"), float("inf"), "0.7"):
        with pytest.raises(ValueError, match=r"temperature=.* must be a finite number > 0 when sampling"):
            model.generate(prompt, 3, do_sample=True, temperature=bad)
    with pytest.raises(ValueError, match="every prompt must end in a real token"):
        model.generate(prompt, 3, attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    for bad in (0, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=r"top_p=.* must be None or a number in \(0, 1\]"):
            model.generate(prompt, 3, do_sample=True, top_p=bad)
    for bad in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=r"min_p=.* must be None or a number in \[0, 1\]"):
            model.generate(prompt, 3, do_sample=True, min_p=bad)
    for bad in (0, -1.0, float("inf"), float("nan"), "1.2"):
        with pytest.raises(ValueError, match=r"repetition_penalty=.* must be None or a finite number > 0"):
            model.generate(prompt, 3, repetition_penalty=bad)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"top_k={bad!r} must be None or an integer >= 0"):
            model.generate(prompt, 3, do_sample=True, top_k=bad)
    for bad in (2.0, -1, True):
        with pytest.raises(ValueError, match=rf"max_new_tokens={bad!r} must be an integer >= 0"):
            model.generate(prompt, bad)
        with pytest.raises(ValueError, match=rf"max_length={bad!r} must be an integer >= 0"):
            model.generate(prompt, max_length=bad)
    with pytest.raises(ValueError, match="generate needs max_new_tokens"):
        model.generate(prompt)
    with pytest.raises(ValueError, match="seed and generator: give one"):
        model.generate(prompt, 3, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"input_ids must be \(T,\) or \(B, T\) with B, T >= 1, got \(0, 4\)"):
        model.generate(prompt[:0], 3)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(2, 4\), got \(2, 3\)"):
        model.generate(prompt, 3, attention_mask=torch.ones(2, 3, dtype=torch.long))
    for name, value in (("eos_token_id", 300), ("pad_token_id", -1), ("eos_token_id", 1.0), ("eos_token_id", [2, -3])):
        shown = value[-1] if isinstance(value, list) else value
        with pytest.raises(ValueError, match=rf"{name}={shown!r} must be None or an integer in \[0, vocab_size=300\)"):
            model.generate(prompt, 3, **{name: value})
    for bad in (-(2**63) - 1, 2**64, 1.5, "7"):
        with pytest.raises(ValueError, match=rf"seed={bad!r} must be None or an integer in \[-2\*\*63, 2\*\*64\)"):
            model.generate(prompt, 3, do_sample=True, seed=bad)
    with pytest.raises(TypeError, match="input_ids must be a tensor of integer token ids, got list"):
        model.generate(prompt.tolist(), 3)
    with pytest.raises(TypeError, match=r"input_ids must be a tensor of integer token ids, got torch\.float32"):
        model.generate(prompt.float(), 3)
    with pytest.raises(TypeError, match=r"attention_mask must be a tensor \(1 = token, 0 = pad\), got list"):
        model.generate(prompt, 3, attention_mask=torch.ones_like(prompt).tolist())
    with pytest.raises(ValueError, match=r"do_sample='no' must be True or False"):
        model.generate(prompt, 3, do_sample="no")
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator, got int"):
        model.generate(prompt, 3, do_sample=True, generator=5)
    for new in (0, 3):  # with no new token too: the prompt is checked as the prefill would check it
        with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=300\)"):
            model.generate(prompt + 300, new)
        with pytest.raises(ValueError, match=r"attention_mask must hold 1 \(token\) and 0 \(pad\) only, got "
                                             r"-1000000000\.0 \(for an additive mask"):
            model.generate(prompt, new, attention_mask=torch.tensor([[-1e9, 0, 0, 0], [0, 0, 0, 0]]))


def test_integer_arguments_may_be_numpy_integers_or_0d_tensors(tiny_model):
    np = pytest.importorskip("numpy")
    model = tiny_model(dtype=torch.float32)
    prompt = torch.randint(0, 300, (2, 4))
    kw = dict(do_sample=True, top_k=5, vocab_limit=280, seed=3, eos_token_id=7, pad_token_id=9)
    expected = model.generate(prompt, 4, **kw)
    for wrap in (np.int64, torch.tensor):
        assert torch.equal(model.generate(prompt, wrap(4), **{k: wrap(v) for k, v in kw.items()}), expected)
        assert torch.equal(model.generate(prompt, max_length=wrap(8), **kw), expected)
    numbers = dict(temperature=0.75, top_p=0.875)  # exact in fp32: numpy and tensor scalars give the same draws
    expected = model.generate(prompt, 4, **kw, **numbers)
    for wrap in (np.float32, torch.tensor):
        assert torch.equal(model.generate(prompt, 4, **kw, **{k: wrap(v) for k, v in numbers.items()}), expected)
    model.generate(prompt, 2, do_sample=True, seed=-1)  # torch.manual_seed takes negative seeds too


def test_a_pad_id_at_or_above_vocab_limit_continues_a_finished_row_under_a_repetition_penalty(tiny_model):
    """A finished row is continued with pad_token_id, which may lie at or above vocab_limit (it is not chosen, only
    written): the penalty's record of the row's tokens leaves it out instead of failing; the other row goes on as
    it would alone."""
    model = tiny_model(dtype=torch.float32)
    prompts = torch.tensor([[5, 6, 7], [9, 10, 11]])
    first = model.generate(prompts, 1, vocab_limit=100)[:, -1].tolist()
    assert first[0] != first[1]
    kw = dict(vocab_limit=100, repetition_penalty=1.2, eos_token_id=first[0])
    out = model.generate(prompts, 4, pad_token_id=250, **kw)
    assert out[0, 3:].tolist() == [first[0], 250, 250, 250]
    assert torch.equal(out[1], model.generate(prompts[1], 4, **kw)[0])


def test_eos_outside_vocab_limit_runs_to_max_new_tokens(tiny_model):
    """EOS ids at or above vocab_limit cannot be chosen: generation ends at max_new_tokens."""
    model = tiny_model(dtype=torch.float32)
    out = model.generate(torch.randint(0, 300, (2, 4)), 5, eos_token_id=[280, 290], vocab_limit=260)
    assert out.shape == (2, 9) and int(out[:, 4:].max()) < 260


def test_a_tiny_temperature_samples_the_argmax_instead_of_failing(tiny_model):
    model = tiny_model(dtype=torch.float32)
    prompt = torch.randint(0, 300, (2, 4))
    greedy = model.generate(prompt, 4)
    for temperature in (1e-40, 1e-45):
        assert torch.equal(model.generate(prompt, 4, do_sample=True, temperature=temperature, seed=0), greedy)


def test_the_cache_is_not_allocated_for_a_huge_max_new_tokens_but_grows(tiny_model, monkeypatch):
    """Room for PREALLOCATED_NEW_TOKENS new tokens is made up front; beyond it the cache grows, with the same
    tokens as a cache made big enough at once."""
    model = tiny_model()
    prompt = torch.randint(3, 300, (2, 5))

    class Enough(Exception):
        pass

    seen: list[torch.Tensor] = []

    def stop_after_three(token: torch.Tensor) -> None:
        seen.append(token)
        if len(seen) == 3:
            raise Enough

    with pytest.raises(Enough):  # not an allocation of 10**15 positions
        model.generate(prompt, 10**15, streamer=stop_after_three)
    whole = model.generate(prompt, 12)
    monkeypatch.setattr("mixcon.generation.generate.PREALLOCATED_NEW_TOKENS", 2)
    caches = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1])
    assert torch.equal(model.generate(prompt, 12), whole)
    # Doubled from 7 positions, up to the 17 of the prompt and max_new_tokens (the size cache_nbytes gives for
    # the generation's length), not to 28.
    attention = [layer for layer in caches[0].layers if hasattr(layer, "k")]
    assert caches[0].key_mask.shape[1] == 17 and all(layer.k.shape[2] == 17 for layer in attention) and attention


def test_no_new_tokens_is_a_copy_of_the_prompt_without_a_forward(tiny_model, monkeypatch):
    model = tiny_model()
    prompt = torch.randint(0, 300, (2, 5))
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("a forward for nothing"))
    out = model.generate(prompt, 0)
    assert torch.equal(out, prompt) and out.data_ptr() != prompt.data_ptr()


def test_one_prompt_may_come_without_a_batch_dimension(tiny_model):
    model = tiny_model(dtype=torch.float32)
    prompt = torch.randint(0, 300, (6,))
    expected = model.generate(prompt[None], 4)
    assert torch.equal(model.generate(prompt, 4), expected)
    assert torch.equal(model.generate(prompt, 4, attention_mask=torch.ones(6, dtype=torch.long)), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batched_greedy_equals_cpu(tiny_model):
    model = tiny_model()
    prompts = [torch.randint(3, 300, (n,)) for n in (3, 11, 7)]
    ids, mask = left_pad(prompts, pad=5)
    on_cpu = model.generate(ids, 12, attention_mask=mask)
    on_gpu = model.cuda().generate(ids.cuda(), 12, attention_mask=mask.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), on_cpu)


def test_compiled_decode_equals_eager_with_one_graph(have_c_compiler, tiny_model):
    """`compile_decode`: the same logits and cache as the eager step, from one graph for every step, whatever
    the strides of the token column."""
    from torch._dynamo.utils import counters

    if not have_c_compiler:
        pytest.skip("torch.compile's CPU backend needs a C/C++ compiler")
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(dtype=torch.float32, attn_rope=True)
    prompts = [torch.randint(3, 300, (n,)) for n in (4, 9)]
    ids, mask = left_pad(prompts)
    caches, logits = [], []
    with torch.no_grad():
        for compiled in (False, True):
            if compiled:
                model.compile_decode(dynamic=False)
            cache = model.new_cache(2, max_length=ids.shape[1] + 5)
            out = [model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits]
            for step in range(5):
                token = out[-1][:, -1].argmax(-1, keepdim=True)  # (2, 1), strides (1, 1)
                if step == 0:  # a column of a wider tensor, as a prompt's last token: strides (2, 1)
                    token = token.repeat(1, 2)[:, :1]
                out.append(model(token, cache=cache).logits)
            caches.append(cache)
            logits.append(torch.cat(out, 1))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    for eager, compiled in zip(caches[0].layers, caches[1].layers, strict=True):
        for a, b in zip(eager.tensors(), compiled.tensors(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # no graph breaks, no recompiles


def test_an_eager_decoding_step_attends_over_the_filled_positions_only(tiny_model, monkeypatch):
    """Eager, attention reads the K/V written so far, not the whole capacity (a compiled step keeps one shape)."""
    import mixcon.layers.attention as attention

    model = tiny_model()
    ids = torch.randint(0, 300, (2, 6))
    seen = []
    decode_attention = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda q, k, v, mask: seen.append(k.shape[2]) or
                        decode_attention(q, k, v, mask))
    with torch.no_grad():
        cache = model.new_cache(2, max_length=64)
        logits = [model(ids[:, :4], cache=cache).logits, model(ids[:, 4:5], cache=cache).logits,
                  model(ids[:, 5:], cache=cache).logits]
        torch.testing.assert_close(torch.cat(logits, 1), model(ids).logits, rtol=1e-9, atol=1e-9)
    n_attention = sum(mixer == "attention" for mixer, _ in model.config.layout())
    assert n_attention and seen == [5] * n_attention + [6] * n_attention


def test_copies_of_a_compiled_model_decode_with_their_own_weights(have_c_compiler, tiny_model):
    """copy.deepcopy and pickle after compile_decode / compile_prefill: the copy compiles its own step (a step
    compiled for the original would read the original's weights) and decodes as its own full forward."""
    if not have_c_compiler:
        pytest.skip("torch.compile's CPU backend needs a C/C++ compiler")
    model = tiny_model(dtype=torch.float32)
    model.compile_decode()
    model.compile_prefill(segment=8)
    ids = torch.randint(0, 300, (1, 12))
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(1.5)
    unpickled = pickle.loads(pickle.dumps(copied))
    for m in (model, copied, unpickled):
        assert m._decode_step is not None and m._compiled.keys() == {"decode", "prefill"}
        with torch.no_grad():
            cache = m.new_cache(1)
            logits = [m(ids[:, :-2], cache=cache).logits, m(ids[:, -2:-1], cache=cache).logits,
                      m(ids[:, -1:], cache=cache).logits]
            torch.testing.assert_close(torch.cat(logits, 1), m(ids).logits, rtol=1e-4, atol=1e-4)


def test_compiled_prefill_equals_eager_with_one_graph(have_c_compiler, tiny_model):
    """`compile_prefill`: the same logits and cache as the eager prefill for prompts of any length, with
    the Conba layers run by one static graph (per padding or not, shared by all layers), with or without a
    cache; forwards with autograd stay eager."""
    from torch._dynamo.utils import counters

    if not have_c_compiler:
        pytest.skip("torch.compile's CPU backend needs a C/C++ compiler")
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(dtype=torch.float32)
    eager = tiny_model(dtype=torch.float32)
    model.compile_prefill(segment=12, chunk=5)  # segments and chunks that divide nothing in sight
    assert all(layer.mixer.prefill.segment == 12 for layer in model.layers if layer.mixer_kind == "conba")
    for lengths in [(5, 12), (37, 40), (3, 70)]:  # one segment, several plus a rest, shorter than a segment
        ids, mask = left_pad([torch.randint(3, 300, (n,)) for n in lengths])
        caches, logits = [], []
        with torch.no_grad():
            for m in (eager, model):
                cache = m.new_cache(2, max_length=ids.shape[1] + 1)
                logits.append(m(ids, attention_mask=mask, cache=cache).logits)
                caches.append(cache)
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
        for a_layer, b_layer in zip(caches[0].layers, caches[1].layers, strict=True):
            for a, b in zip(a_layer.tensors(), b_layer.tensors(), strict=True):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # every layer and length: one graph
    with torch.no_grad():  # no cache: tails and states chained from zeros, through the same graph
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    ids = torch.randint(3, 300, (1, 40))
    with torch.no_grad():  # no padding: the second graph
        torch.testing.assert_close(model(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(model(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)  # with autograd: eager
    assert counters["stats"]["unique_graphs"] == 2
    with pytest.raises(ValueError, match="segment=12 and chunk=0 must be integers >= 1"):
        model.compile_prefill(segment=12, chunk=0)


def test_eos_ids_may_be_a_tensor_and_cache_sizes_must_be_integers(tiny_model):
    """transformers' generation configs hold EOS ids as tensors; a cache of 2.0 rows is refused by name."""
    from mixcon import MixConCache

    model = tiny_model(dtype=torch.float32)
    prompt = torch.tensor([[5, 6, 7]])
    free = model.generate(prompt, 4)[0, 3:].tolist()
    eos = free[1]
    assert torch.equal(model.generate(prompt, 4, eos_token_id=torch.tensor([299, eos])),
                       model.generate(prompt, 4, eos_token_id=[299, eos]))
    assert torch.equal(model.generate(prompt, 4, eos_token_id=torch.tensor(eos)),
                       model.generate(prompt, 4, eos_token_id=eos))
    with pytest.raises(ValueError, match=r"batch_size=2.0 and max_length=8 must be integers >= 1"):
        MixConCache(model.config, 2.0, 8)


def test_a_max_length_the_prompt_just_fills_warns_too(tiny_model):
    """max_length equal to the prompt's length leaves no room either: the warning, and the prompt alone back."""
    model = tiny_model(dtype=torch.float32)
    prompt = torch.randint(0, 300, (2, 5))
    with pytest.warns(UserWarning, match=r"max_length=5 leaves no room after the prompt's 5 tokens") as caught:
        assert torch.equal(model.generate(prompt, max_length=5), prompt)
    assert caught[0].filename == __file__


def test_top_p_of_one_filters_nothing_however_unlikely_a_token():
    """top_p=1 keeps every token, also those whose mass float rounding absorbs (the mass before them sums to 1.0 in
    fp32): transformers' generate skips top-p at 1."""
    logits = torch.tensor([[0.0, -30.0, -31.0], [2.0, 1.0, -40.0]])
    assert filter_logits(logits, 1.0, None, 1.0).isfinite().all()
    assert filter_logits(logits, 1.0, None, 0.999).isinf().any()  # a top_p under 1 drops them


def test_the_bounds_of_the_sampling_arguments_are_accepted(tiny_model):
    """top_p=1, min_p=0 and vocab_limit=vocab_size filter nothing; a temperature of 0 is fine for greedy decoding
    (transformers' configs hold one), which never reads it."""
    model = tiny_model(dtype=torch.float32)
    prompt = torch.randint(0, 300, (2, 4))
    sampled = dict(do_sample=True, seed=5)
    expected = model.generate(prompt, 4, **sampled)
    for kw in (dict(top_p=1.0), dict(min_p=0.0), dict(vocab_limit=300)):
        assert torch.equal(model.generate(prompt, 4, **kw, **sampled), expected), kw
    assert torch.equal(model.generate(prompt, 4, temperature=0.0), model.generate(prompt, 4))
    for bad in (0, 301, 2.5):
        with pytest.raises(ValueError, match=rf"vocab_limit={bad!r} must be None or an integer in \[1, vocab_size="):
            model.generate(prompt, 3, vocab_limit=bad)


def test_one_row_is_sampled_as_a_batch_of_one(tiny_model):
    """sample_next gives (B,) tokens for B = 1 too, and generate samples a single prompt (no EOS nor pad id to fill
    with)."""
    logits = torch.randn(1, 50)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, do_sample=True, temperature=1.0, top_k=None, top_p=None, generator=g).shape == (1,)
    model = tiny_model(dtype=torch.float32)
    assert model.config.eos_token_id is None and model.config.pad_token_id is None
    prompt = torch.randint(0, 300, (1, 4))
    out = model.generate(prompt, 5, do_sample=True, seed=0)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], prompt)


def test_the_configs_eos_id_stops_generation(tiny_model):
    """With no eos_token_id given, the config's ends a row, as transformers' generation config does."""
    prompt = torch.tensor([[5, 6, 7, 8]])
    free = tiny_model(dtype=torch.float32).generate(prompt, 6)[0, 4:].tolist()
    eos = free[1]
    assert eos not in free[:1]
    out = tiny_model(dtype=torch.float32, eos_token_id=eos).generate(prompt, 6)
    assert out[0, 4:].tolist() == free[:2]


def test_stopping_criteria_may_return_one_bool_for_all_rows(tiny_model):
    """A criteria's plain True ends every row (transformers' StoppingCriteria may return a bool)."""
    model = tiny_model(dtype=torch.float32, pad_token_id=0)
    prompt = torch.randint(3, 300, (2, 4))
    free = model.generate(prompt, 5)
    calls = []
    out = model.generate(prompt, 5, stopping_criteria=lambda ids, scores: calls.append(ids.shape[1]) or len(calls) == 2)
    assert calls == [5, 6] and torch.equal(out, free[:, :6])


def test_generation_reads_the_last_positions_logits_once_per_new_token(tiny_model):
    """The prefill computes the logits of the prompt's last position only, and each new token needs one forward:
    none after the last one (its logits would choose nothing)."""
    model = tiny_model(dtype=torch.float32)
    prompt = torch.randint(3, 300, (2, 7))
    widths = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    model.generate(prompt, 4)
    hook.remove()
    assert widths == [1, 1, 1, 1]


def test_a_training_model_generates_in_eval_mode_and_goes_on_training(tiny_model):
    """generate runs the model in eval mode (no Conba noise: the tokens of the eval model) and leaves it training."""
    model = tiny_model(dtype=torch.float32, conba_process_noise=0.5, conba_observation_noise=0.5)
    prompt = torch.randint(3, 300, (2, 5))
    expected = model.generate(prompt, 6)
    model.train()
    assert torch.equal(model.generate(prompt, 6), expected) and model.training


def test_decoding_steps_run_under_inference_mode_and_what_generate_gives_back_trains(tiny_model):
    """Each step after the prefill runs under torch.inference_mode (the prefill under no_grad, whose compiled graphs
    the model's other forwards share); the sequences returned and the tokens streamed are ordinary tensors: a
    model may train on them."""
    model = tiny_model(dtype=torch.float32)
    prompt = torch.randint(3, 300, (2, 5))
    modes, streamed = [], []
    hook = model.register_forward_pre_hook(
        lambda module, args: modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled())))
    out = model.generate(prompt, 4, streamer=streamed.append)
    hook.remove()
    assert modes == [(False, False)] + [(False, True)] * 3
    assert not out.is_inference() and not any(t.is_inference() for t in streamed)
    ids = torch.cat([out, torch.stack(streamed, 1)], 1)
    model(ids, labels=ids).loss.backward()
