"""The `lm-eval` adapter against plain forwards and `generate`, and the harness end to end on local tasks."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="the lm-eval harness is not installed (pip install 'mixcon[eval]')")

from lm_eval.api.instance import Instance

from mixcon import MixConCache
from mixcon.data import ByteTokenizer
from mixcon.evaluation import evaluate_texts
from mixcon.generation.cache import AttentionCache
from mixcon.integrations.lm_eval import MixConLM

TOK = ByteTokenizer()


@pytest.fixture
def lm(tiny_model) -> MixConLM:
    return MixConLM(tiny_model(vocab_size=TOK.vocab_size), tokenizer=TOK, batch_size=3)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def logprob(model, context: str, continuation: str) -> tuple[float, bool]:
    """One forward over EOS + context + continuation: the continuation's log-probability and greediness."""
    ids = [TOK.eos_id, *TOK.encode(context + continuation)]
    n = len(TOK.encode(continuation))
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0, -n:]
    target = torch.tensor(ids[-n:])
    return (float(-F.cross_entropy(logits, target, reduction="sum")), bool((logits.argmax(-1) == target).all()))


def greedy_text(model, context: str, n: int) -> str:
    ids = torch.tensor([[TOK.eos_id, *TOK.encode(context)]])
    return TOK.decode(model.generate(ids, n)[0, ids.shape[1]:].tolist())


def test_loglikelihood_equals_one_forward_per_request_in_request_order(lm):
    greedy = greedy_text(lm.model, "abc", 4)
    pairs = [("The cat", " sat"), ("", "hello"), ("abc", greedy), ("a longer context, with more bytes", " x"),
             ("q", "")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    want = [logprob(lm.model, c, x) if x else (0.0, True) for c, x in pairs]
    assert [g for _, g in got] == [g for _, g in want]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in want], rel=1e-10)
    assert got[2][1] and not got[0][1]  # the model's own greedy continuation, and (almost surely) not " sat"


def test_continuations_of_one_context_share_its_prefill_and_score_as_alone(lm, monkeypatch):
    context = "Q: a or b?"  # its greedy continuation is valid UTF-8: "[[["
    greedy = greedy_text(lm.model, context, 3)
    pairs = [(context, " yes"), ("other", " x"), (context, "!"), (context, greedy), (context, " no, not at all"),
             ("", "a"), ("", "bc")]
    prefills, branches = [], []
    monkeypatch.setattr(lm, "_score_shared", lambda prefix, conts, f=lm._score_shared: prefills.append(prefix)
                        or f(prefix, conts))
    monkeypatch.setattr(MixConCache, "branch", lambda cache, index, f=MixConCache.branch: branches.append(len(index))
                        or f(cache, index))
    grown = []  # the prefilled cache has room for the longest continuation: no branch grows (copies) it
    monkeypatch.setattr(AttentionCache, "grow", lambda layer, n, f=AttentionCache.grow: grown.append(n) or f(layer, n))
    lm.batch_size = 2  # the four continuations of `context`: one prefill, two branches of it
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    want = [logprob(lm.model, c, x) for c, x in pairs]
    assert [g for _, g in got] == [g for _, g in want] and got[3][1]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in want], rel=1e-10)
    eos_context = [TOK.eos_id, *TOK.encode(context)]
    assert prefills == [eos_context, [TOK.eos_id]] and branches == [2, 2, 2] and grown == []


def test_an_empty_continuation_beside_others_of_its_context_is_certain(lm):
    """An empty continuation has probability 1 and is greedy, also where other continuations share its context."""
    pairs = [("Q:", ""), ("Q:", " a"), ("Q:", " bc")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    assert got[0] == (0.0, True)
    assert [v for v, _ in got[1:]] == pytest.approx([logprob(lm.model, c, x)[0] for c, x in pairs[1:]], rel=1e-10)


def test_one_token_continuations_of_one_context_are_scored_from_its_prefill_alone(lm, monkeypatch):
    """Multiple choice over single letters: the prefill's last hidden state scores each; no branch is made."""
    branches = []
    monkeypatch.setattr(MixConCache, "branch", lambda cache, index, f=MixConCache.branch: branches.append(len(index))
                        or f(cache, index))
    pairs = [("Answer:", c) for c in "ABCD"]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    want = [logprob(lm.model, c, x) for c, x in pairs]
    assert [g for _, g in got] == [g for _, g in want]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in want], rel=1e-10)
    assert branches == []


def test_rolling_loglikelihood_is_the_whole_document_and_matches_an_empty_context(lm):
    texts = ["First document.\n" * 5, "", "second"]
    rolling = lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in texts], disable_tqdm=True)
    assert rolling[1] == 0.0
    assert rolling[0] == pytest.approx(-evaluate_texts(lm.model, TOK, texts[:1]).nll, rel=1e-10)
    assert rolling[2] == pytest.approx(logprob(lm.model, "", texts[2])[0], rel=1e-10)
    lm.context = 7  # streamed in 7-token chunks: still exact
    assert lm.loglikelihood_rolling([request("loglikelihood_rolling", texts[0])], disable_tqdm=True) == \
        pytest.approx(rolling[:1], rel=1e-10)


@pytest.mark.parametrize("n_bytes", [9, 23, 30])  # within one window, a short last window, a multiple of it
def test_rolling_loglikelihood_with_max_length_is_lm_evals_rolling_windows(tiny_model, n_bytes):
    """lm-eval's own definition: get_rolling_token_windows + make_disjoint_window, each window one forward."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model = tiny_model(vocab_size=TOK.vocab_size)
    lm = MixConLM(model, tokenizer=TOK, max_length=10, batch_size=2)
    text = "rolling windows over bytes"[:n_bytes] + "x" * max(0, n_bytes - 26)
    want = 0.0
    for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
            TOK.encode(text), prefix_token=TOK.eos_id, max_seq_len=10, context_len=1)):
        inputs = (context + continuation)[:-1]
        with torch.no_grad():
            logits = model(torch.tensor([inputs])).logits[0, -len(continuation):]
        want -= float(F.cross_entropy(logits, torch.tensor(continuation), reduction="sum"))
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    assert got == pytest.approx([want], rel=1e-10)


def test_max_length_truncates_the_context_from_the_left(tiny_model):
    model = tiny_model(vocab_size=TOK.vocab_size)
    lm = MixConLM(model, tokenizer=TOK, max_length=6)
    (got, _), = lm.loglikelihood([request("loglikelihood", "0123456789", "ab")], disable_tqdm=True)
    ids = [TOK.eos_id, *TOK.encode("0123456789ab")][-7:]  # 6 inputs predict the last 6 tokens
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0, -2:]
    assert got == pytest.approx(float(-F.cross_entropy(logits, torch.tensor(ids[-2:]), reduction="sum")), rel=1e-10)


def test_max_length_truncates_contexts_that_continuations_share(tiny_model):
    """Multiple choice (one context, several continuations) with max_length: each scored on its last max_length
    predictions, as alone (the shared prefill of the whole context is not taken then)."""
    model = tiny_model(vocab_size=TOK.vocab_size)
    lm = MixConLM(model, tokenizer=TOK, max_length=8)
    context = "0123456789abcdefghij"
    got = lm.loglikelihood([request("loglikelihood", context, x) for x in (" yes", " no")], disable_tqdm=True)
    for (value, _), x in zip(got, (" yes", " no"), strict=True):
        ids = [TOK.eos_id, *TOK.encode(context + x)][-9:]  # 8 inputs predict the last 8 tokens
        n = len(TOK.encode(x))
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]])).logits[0, -n:]
        assert value == pytest.approx(float(-F.cross_entropy(logits, torch.tensor(ids[-n:]), reduction="sum")),
                                      rel=1e-10)


def test_generate_until_is_greedy_generation_cut_at_the_first_stop_string(lm):
    full = greedy_text(lm.model, "Once", 12)
    stop = full[5:7]
    requests = [request("generate_until", "Once", {"until": [stop], "max_gen_toks": 12}),
                request("generate_until", "Once", {"until": "never", "max_gen_toks": 12, "do_sample": False}),
                request("generate_until", "Once", {"max_gen_toks": 3})]
    got = lm.generate_until(requests, disable_tqdm=True)
    assert got == [full[:full.index(stop)], full, greedy_text(lm.model, "Once", 3)]
    # an empty stop string stops nothing; a bare string is one stop, not one per character
    odd = [request("generate_until", "Once", {"until": ["", stop], "max_gen_toks": 12}),
           request("generate_until", "Once", {"until": full[0] + "\x00", "max_gen_toks": 12})]
    assert lm.generate_until(odd, disable_tqdm=True) == [full[:full.index(stop)], full]
    # do_sample with temperature 0, as tasks write greedy decoding, is greedy
    sampled = request("generate_until", "Once", {"max_gen_toks": 12, "do_sample": True, "temperature": 0.0})
    assert lm.generate_until([sampled], disable_tqdm=True) == [full]
    with pytest.warns(UserWarning, match=r"ignores the generation arguments \['num_beams'\]"):
        lm.generate_until([request("generate_until", "x", {"max_gen_toks": 1, "num_beams": 1})], disable_tqdm=True)


def test_generate_until_reads_every_name_lm_eval_gives_the_token_budget(lm, monkeypatch):
    """max_gen_toks, else max_new_tokens (transformers' name, in task files), max_tokens, max_completion_tokens."""
    requests = [request("generate_until", "Once", {name: 3, "until": ["never"]})
                for name in ("max_new_tokens", "max_tokens", "max_completion_tokens")]
    requests.append(request("generate_until", "Once", {"max_tokens": 9, "max_gen_toks": 3, "until": ["never"]}))
    assert lm.generate_until(requests, disable_tqdm=True) == [greedy_text(lm.model, "Once", 3)] * 4
    asked = []
    generate = lm.model.generate
    monkeypatch.setattr(lm.model, "generate", lambda ids, n, **kw: asked.append(n) or generate(ids, 2, **kw))
    lm.generate_until([request("generate_until", "Once", {"until": ["never"]})], disable_tqdm=True)
    assert asked == [256]  # none named: lm-eval's default


def test_max_length_keeps_room_for_the_new_tokens(tiny_model, monkeypatch):
    """As lm-eval's HF model: a prompt keeps its last max_length - max_gen_toks tokens."""
    model = tiny_model(vocab_size=TOK.vocab_size)
    lm = MixConLM(model, tokenizer=TOK, max_length=8)
    prompts, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda ids, *a, **k: prompts.append(ids.tolist()) or generate(ids, *a, **k))
    (got,) = lm.generate_until([request("generate_until", "0123456789", {"max_gen_toks": 3, "until": ["never"]})],
                               disable_tqdm=True)
    prompt = TOK.encode("0123456789")[-5:]
    assert prompts == [[prompt]]
    assert got == TOK.decode(generate(torch.tensor([prompt]), 3)[0, 5:].tolist())
    with pytest.raises(ValueError, match=r"max_length=8 leaves no room for a prompt before 8 new tokens"):
        lm.generate_until([request("generate_until", "x", {"max_gen_toks": 8})], disable_tqdm=True)


def test_generated_text_is_cut_at_its_earliest_stop_string_whatever_their_order(lm, monkeypatch):
    monkeypatch.setattr(lm, "tok_decode", lambda tokens, **kw: "a.b\nc")
    got = lm.generate_until([request("generate_until", "x", {"until": ["\n", "."], "max_gen_toks": 2})],
                            disable_tqdm=True)
    assert got == ["a"]


def test_generation_ends_once_every_row_holds_a_stop_string(lm, monkeypatch):
    """Rows stop at their stop string, not at max_gen_toks: the decoding steps end with the last row's stop."""
    texts = [greedy_text(lm.model, c, 30) for c in ("Once", "Twice")]
    stops = [texts[0][3:5], texts[1][8:10]]
    tokens = [lm.model.generate(torch.tensor([[TOK.eos_id, *TOK.encode(c)]]), 30)[0, 1 + len(c):].tolist()
              for c in ("Once", "Twice")]
    steps = max(next(n for n in range(1, 31) if any(s in TOK.decode(row[:n]) for s in stops)) for row in tokens)
    assert steps < 30
    forward, calls = lm.model.forward, []
    monkeypatch.setattr(lm.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    requests = [request("generate_until", c, {"until": stops, "max_gen_toks": 30}) for c in ("Once", "Twice")]
    got = lm.generate_until(requests, disable_tqdm=True)
    assert got == [t[:min(t.index(s) for s in stops if s in t)] for t in texts]
    assert len(calls) == steps  # the prefill, then a step per token after the first


def test_batched_generation_equals_one_request_at_a_time(lm):
    contexts = ["a", "a much longer context than the others", "mid length", "", "zz", "The end"]
    requests = [request("generate_until", c, {"max_gen_toks": 6 + 2 * (i % 2), "until": ["never"]})
                for i, c in enumerate(contexts)]
    lm.batch_size = 4  # two groups of arguments, one of them in two batches
    batched = lm.generate_until(requests, disable_tqdm=True)
    assert batched == [greedy_text(lm.model, c, 6 + 2 * (i % 2)) for i, c in enumerate(contexts)]
    lm.batch_size = 1
    assert lm.generate_until(requests, disable_tqdm=True) == batched


def test_sampling_with_temperature_is_seeded(lm, tiny_model):
    kwargs = {"max_gen_toks": 8, "temperature": 1.0, "do_sample": True}
    a = lm.generate_until([request("generate_until", "x", dict(kwargs))], disable_tqdm=True)
    b = lm.generate_until([request("generate_until", "x", {**kwargs, "seed": 0})], disable_tqdm=True)
    assert a == b  # the model's seed (0 by default), or the task's
    other = MixConLM(lm.model, tokenizer=TOK, batch_size=3, seed=1)
    c = other.generate_until([request("generate_until", "x", dict(kwargs))], disable_tqdm=True)
    assert c != a
    assert lm.generate_until([request("generate_until", "x", {**kwargs, "seed": 1})], disable_tqdm=True) == c
    lm.batch_size = 1  # repeated requests (a task's `repeats`), one per batch: each its own sample
    repeats = lm.generate_until([request("generate_until", "x", dict(kwargs)) for _ in range(4)], disable_tqdm=True)
    assert len(set(repeats)) > 1


def test_a_positive_temperature_asks_for_sampling_unless_do_sample_is_false(lm):
    """Greedy unless a task asks for sampling: a temperature alone samples (the draws of do_sample=True);
    do_sample=False keeps greedy decoding whatever the temperature."""
    kwargs = {"max_gen_toks": 8, "until": ["never"], "temperature": 1.0}
    sampled = lm.generate_until([request("generate_until", "x", {**kwargs, "do_sample": True})], disable_tqdm=True)
    assert lm.generate_until([request("generate_until", "x", dict(kwargs))], disable_tqdm=True) == sampled
    greedy = lm.generate_until([request("generate_until", "x", {**kwargs, "do_sample": False})], disable_tqdm=True)
    assert greedy == [greedy_text(lm.model, "x", 8)] != sampled


def test_generate_until_hands_min_p_and_the_repetition_penalty_to_generate(lm, monkeypatch):
    """A task's repetition_penalty reaches generate greedy or sampled; min_p, top_k and top_p when sampling (greedy
    drops the sampling arguments, as before)."""
    asked = []
    generate = lm.model.generate
    monkeypatch.setattr(lm.model, "generate", lambda ids, n, **kw: asked.append(kw) or generate(ids, n, **kw))
    greedy = {"max_gen_toks": 4, "repetition_penalty": 1.5, "min_p": 0.2}
    sampled = {**greedy, "do_sample": True, "temperature": 1.0, "top_k": 5, "top_p": 0.9}
    for kwargs in (greedy, sampled):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither argument is reported as ignored
            lm.generate_until([request("generate_until", "x", kwargs)], disable_tqdm=True)
    assert asked[0]["repetition_penalty"] == 1.5 and "min_p" not in asked[0]
    assert asked[1]["repetition_penalty"] == 1.5 and asked[1]["min_p"] == 0.2 and asked[1]["do_sample"]
    assert (asked[1]["top_k"], asked[1]["top_p"], asked[1]["temperature"]) == (5, 0.9, 1.0)
    monkeypatch.undo()
    plain = lm.generate_until([request("generate_until", "x", {"max_gen_toks": 12})], disable_tqdm=True)
    ids = torch.tensor([[TOK.eos_id, *TOK.encode("x")]])
    penalized = TOK.decode(lm.model.generate(ids, 12, repetition_penalty=3.0)[0, 2:].tolist())
    got = lm.generate_until([request("generate_until", "x", {"max_gen_toks": 12, "repetition_penalty": 3.0})],
                            disable_tqdm=True)
    assert got == [penalized] != plain

def test_generation_picks_only_ids_the_tokenizer_decodes(tiny_model):
    """A model with more ids than its tokenizer (e.g. after resize_token_embeddings): the extra ones would
    not decode, so they are never chosen, sampled or greedy."""
    model = tiny_model(vocab_size=TOK.vocab_size + 40)
    with torch.no_grad():  # make the extra ids the likeliest
        model.lm_head.weight[TOK.vocab_size:] = 10 * model.lm_head.weight[:40].abs().sum()
    lm = MixConLM(model, tokenizer=TOK, batch_size=2)
    for kwargs in ({"max_gen_toks": 6}, {"max_gen_toks": 6, "temperature": 1.0, "do_sample": True}):
        lm.generate_until([request("generate_until", "x", kwargs)], disable_tqdm=True)  # decodes, no error
    out = model.generate(torch.tensor([[TOK.eos_id]]), 6, vocab_limit=TOK.vocab_size)
    assert int(out.max()) < TOK.vocab_size
    greedy = lm.generate_until([request("generate_until", "x", {"max_gen_toks": 3, "until": ["never"]})],
                               disable_tqdm=True)[0]
    assert len(TOK.encode(greedy)) == 3
    (_, is_greedy), = lm.loglikelihood([request("loglikelihood", "x", greedy)], disable_tqdm=True)
    assert is_greedy  # greedy among the ids generation may choose, as generate_until chose them
    with pytest.raises(ValueError, match=r"vocab_limit=0 must be None or an integer in \[1, vocab_size=299\]"):
        model.generate(torch.tensor([[TOK.eos_id]]), 2, vocab_limit=0)


def test_a_continuation_longer_than_max_length_is_refused(tiny_model):
    lm = MixConLM(tiny_model(vocab_size=TOK.vocab_size), tokenizer=TOK, max_length=4)
    with pytest.raises(ValueError, match="a continuation of 5 tokens is longer than max_length=4"):
        lm.loglikelihood([request("loglikelihood", "abc", "defgh")], disable_tqdm=True)
    exact = lm.loglikelihood([request("loglikelihood", "abc", "defg")], disable_tqdm=True)  # 4 fit, just
    with torch.no_grad():  # its 4 predictions from the last max_length inputs: "c" onwards
        logp = lm.model(torch.tensor([TOK.encode("cdef")])).logits.log_softmax(-1)[0]
    assert exact[0][0] == pytest.approx(float(logp.gather(1, torch.tensor([TOK.encode("defg")]).T).sum()), rel=1e-5)


def test_loads_a_saved_model_from_arguments_and_rejects_bad_ones(tiny_model, tmp_path):
    model = tiny_model(dtype=torch.float32, vocab_size=TOK.vocab_size)
    model.save_pretrained(tmp_path)
    lm = MixConLM.create_from_arg_string(f"pretrained={tmp_path},tokenizer=bytes,dtype=bf16,max_length=64",
                                         {"batch_size": 4, "max_batch_size": None, "device": "cpu"})
    assert lm.model.embed.weight.dtype == torch.bfloat16 and (lm.batch_size, lm.max_length) == (4, 64)
    with pytest.raises(ValueError, match="dtype='fp8'"):
        MixConLM(model, tokenizer=TOK, dtype="fp8")
    assert MixConLM(copy.deepcopy(model), tokenizer=TOK, dtype="bfloat16").model.embed.weight.dtype == torch.bfloat16
    assert MixConLM(model, tokenizer=TOK, dtype="auto").model.embed.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="batch_size='many' must be a positive integer"):
        MixConLM(model, tokenizer=TOK, batch_size="many")
    assert MixConLM(model, tokenizer=TOK, batch_size="auto:4").batch_size == 8  # lm-eval's --batch_size auto:N
    assert not MixConLM(copy.deepcopy(model).train(), tokenizer=TOK).model.training  # scored in eval mode
    with pytest.raises(ValueError, match="context=0 must be a positive integer"):
        MixConLM(model, tokenizer=TOK, context=0)
    for no_limit in (None, "None", ""):  # model_args "max_length=None" or "max_length=": no truncation
        assert MixConLM(model, tokenizer=TOK, max_length=no_limit).max_length is None
    with pytest.raises(ValueError, match="seed='x' must be an integer"):
        MixConLM(model, tokenizer=TOK, seed="x")
    with pytest.raises(ValueError, match="give the tokenizer"):
        MixConLM(model)
    with pytest.raises(TypeError, match="dtpye"):
        MixConLM.create_from_arg_string(f"pretrained={tmp_path},dtpye=bf16")
    assert MixConLM(model, tokenizer="bytes").tok.vocab_size == TOK.vocab_size
    with pytest.raises(ValueError, match="with pretrained=PATH, tokenizer must be None, 'bytes' or a path"):
        MixConLM(str(tmp_path), tokenizer=TOK)
    assert "prefill" not in MixConLM(model, tokenizer=TOK, compile="false").model._compiled
    assert "prefill" in MixConLM(model, tokenizer=TOK, compile="true").model._compiled  # compiled on first use


@pytest.mark.slow
def test_the_harness_scores_local_tasks_as_the_adapter_and_evaluate_texts_do(lm, local_tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder, DOCS = local_tasks
    tasks = TaskManager(include_path=str(folder))
    out = simple_evaluate(model=lm, tasks=["mixcon_choice", "mixcon_text"], task_manager=tasks, log_samples=False,
                          bootstrap_iters=0)
    results = out["results"]
    correct = []
    for d in DOCS:
        scores = [logprob(lm.model, d["question"], " " + c)[0] for c in d["choices"]]  # the default delimiter
        correct.append(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    assert results["mixcon_choice"]["acc,none"] == pytest.approx(sum(correct) / len(DOCS))
    ours = evaluate_texts(lm.model, TOK, [d["text"] for d in DOCS], mode="stream")
    assert results["mixcon_text"]["bits_per_byte,none"] == pytest.approx(ours.bits_per_byte, rel=1e-9)
    words = sum(len(re.split(r"\s+", d["text"])) for d in DOCS)  # lm-eval's word count
    assert results["mixcon_text"]["word_perplexity,none"] == pytest.approx(math.exp(ours.nll / words), rel=1e-9)


@pytest.mark.slow
def test_the_command_line_prints_and_writes_the_harness_results(tiny_model, local_tasks, tmp_path, capsys):
    from mixcon.cli import main

    tiny_model(dtype=torch.float32, vocab_size=TOK.vocab_size).save_pretrained(tmp_path / "model")
    folder, _ = local_tasks
    out = tmp_path / "results.json"
    args = ["eval", "tasks", "--checkpoint", str(tmp_path / "model"), "--tokenizer", "bytes", "--tasks",
            "mixcon_choice, mixcon_text", "--include-path", str(folder), "--limit", "2", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"mixcon_choice", "mixcon_text"}
    assert "|mixcon_choice|" in printed.replace(" ", "") and "bits_per_byte" in printed
    with pytest.raises(SystemExit, match=r"mixcon eval tasks: --tasks: unknown task.*no_such_task"):
        main([*args[:6], "--tasks", "no_such_task", "--include-path", str(folder)])


def test_the_command_line_help_lists_every_option(capsys):
    from mixcon.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "tasks", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--checkpoint", "--tasks", "--include-path", "--num-fewshot", "--limit", "--max-length",
                 "--context", "--batch-size", "--dtype", "--device", "--compile", "--cuda-graphs", "--seed", "--json"]:
        assert flag in text


def test_cuda_graphs_are_a_model_argument_and_a_flag_for_cuda(tiny_model, tmp_path, monkeypatch):
    """model_args cuda_graphs=true: generation steps through `capture_decode`; `--cuda-graphs` off CUDA is refused
    before anything loads."""
    from mixcon.cli import main

    assert MixConLM(tiny_model(vocab_size=TOK.vocab_size), tokenizer=TOK).model._decode_graphs is None
    lm = MixConLM(tiny_model(vocab_size=TOK.vocab_size), tokenizer=TOK, cuda_graphs="true")
    assert lm.model._decode_graphs is not None
    with pytest.raises(SystemExit, match=r"^mixcon eval tasks: --cuda-graphs needs a CUDA --device, got cpu$"):
        main(["eval", "tasks", "--checkpoint", str(tmp_path / "nothing"), "--tasks", "x", "--cuda-graphs"])
    given = {}

    def record(self, *args, **kwargs):
        given.update(kwargs)
        raise ValueError("recorded")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # --device cuda is checked: as on a GPU machine
    monkeypatch.setattr(MixConLM, "__init__", record)
    with pytest.raises(SystemExit, match="recorded"):
        main(["eval", "tasks", "--checkpoint", str(tmp_path), "--tasks", "x", "--device", "cuda", "--cuda-graphs"])
    assert given["cuda_graphs"] is True


def test_stop_strings_are_found_where_they_end_in_the_text_as_decoded():
    """The stopping criterion against the decoded text: a stop spelled over several tokens (the bytes of one
    character) ends its row at the token that completes it, a row stays done, and a stop that spells U+FFFD
    matches an invalid byte as the decoded text shows it."""
    from mixcon.integrations.lm_eval import StopStrings

    rows = [TOK.encode("héllo wörld") + [TOK.eos_id] * 3, [*TOK.encode("no stop here"), 0xFF, 0x41]]
    prompt = [[TOK.eos_id, 104], [TOK.eos_id, 110]]
    criteria = StopStrings(TOK.decode, ["ö", "lo w"], 2, TOK.token_bytes())
    first = {}
    for n in range(1, 15):
        seqs = torch.tensor([p + r[:n] for p, r in zip(prompt, rows, strict=True)])
        for row, done in enumerate(criteria(seqs, None).tolist()):
            if done:
                first.setdefault(row, n)
    assert first == {0: len(TOK.encode("héllo w"))}  # "lo w" completes before "ö" does
    assert first[0] == next(n for n in range(1, 15) if "lo w" in TOK.decode(rows[0][:n]))
    bad = StopStrings(TOK.decode, ["\ufffdA"], 0, TOK.token_bytes())
    assert bad(torch.tensor([rows[1]]), None).tolist() == [True]
    # ... and only where the text has one: a window cut inside a character would show one that is not there
    clean = StopStrings(TOK.decode, ["\ufffdA"], 0, TOK.token_bytes())
    assert clean(torch.tensor([TOK.encode("🙂A")]), None).tolist() == [False]
    # a stop of more bytes than characters is found in the last tokens (one per byte); a done row stays done when
    # later tokens push its stop out of those
    wide = StopStrings(TOK.decode, ["ab", "。"], 0, TOK.token_bytes())
    assert wide(torch.tensor([TOK.encode("x。")]), None).tolist() == [True]
    late = StopStrings(TOK.decode, ["ab"], 0, TOK.token_bytes())
    assert [late(torch.tensor([TOK.encode("xab" + "c" * n)]), None).tolist() for n in range(3)] == [[True]] * 3
    # special tokens stand for no text: a stop's bytes around them are still found in the window
    pad = TOK.pad_id
    spread = StopStrings(TOK.decode, ["a\nb"], 0, TOK.token_bytes())
    tokens = [*TOK.encode("xa"), pad, pad, *TOK.encode("\n"), pad, pad, pad, *TOK.encode("b")]
    assert spread(torch.tensor([tokens]), None).tolist() == [True]
    # a newest token of many bytes with the stop at its start
    long = StopStrings(TOK.decode, ["ab"], 0, TOK.token_bytes())
    assert long(torch.tensor([[*TOK.encode("xa"), pad, *TOK.encode("b")]]), None).tolist() == [True]


def test_every_result_is_offered_to_lm_evals_request_cache(lm):
    """lm-eval's cache hook (its --use_cache) gets each request's result under its method and arguments."""
    recorded = []

    class Recorder:
        def add_partial(self, method, args, value):
            recorded.append((method, args, value))

    lm.cache_hook = Recorder()
    pairs = lm.loglikelihood([request("loglikelihood", "ab", "c"), request("loglikelihood", "x", "yz")],
                             disable_tqdm=True)
    rolling = lm.loglikelihood_rolling([request("loglikelihood_rolling", "some text")], disable_tqdm=True)
    texts = lm.generate_until([request("generate_until", "Once", {"max_gen_toks": 3})], disable_tqdm=True)
    assert recorded == [("loglikelihood", ("ab", "c"), pairs[0]), ("loglikelihood", ("x", "yz"), pairs[1]),
                        ("loglikelihood_rolling", ("some text",), rolling[0]),
                        ("generate_until", ("Once", {"max_gen_toks": 3}), texts[0])]
