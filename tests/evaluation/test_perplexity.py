"""Perplexity: windows and streaming against brute-force references built from plain forwards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixcon.data.tokenizer import ByteTokenizer
from mixcon.evaluation import TextScore, document_nll, evaluate_texts, window_spans

LAYOUTS = {"mixcon": {}, "conba": dict(attn_per_block=0), "transformer": dict(attn_per_block=4)}


def docs_of(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def full_nll(model, ids: list[int]) -> float:
    """One forward over the whole document: the exact score."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x[:, :-1]).logits[0]
    return float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))


@pytest.mark.parametrize("align_last", [False, True])
@pytest.mark.parametrize("n, context, stride", [(10, 4, 4), (10, 4, 1), (10, 4, 3), (3, 8, 2), (9, 3, 3), (1, 1, 1)])
def test_window_spans_score_each_prediction_once_with_enough_context(n, context, stride, align_last):
    spans = list(window_spans(n, context, stride, align_last))
    if align_last:  # the last window: a full one ending at n
        assert spans[-1][:2] == (max(0, n - context), n)
    scored = []
    for begin, end, new in spans:
        assert 0 < end - begin <= context and 1 <= new <= end - begin
        for j in range(end - new, end):  # prediction j (of ids[j + 1]) sees inputs [begin, j]
            assert j + 1 - begin >= min(j + 1, context - stride + 1)
            scored.append(j)
    assert scored == list(range(n))


def test_window_spans_of_no_predictions_are_none():
    assert list(window_spans(0, 4, 2)) == list(window_spans(0, 4, 2, align_last=True)) == []


def test_window_spans_reject_a_stride_outside_the_context():
    for stride in (0, 5):
        with pytest.raises(ValueError, match=r"stride=.* must be in \[1, context=4\]"):
            list(window_spans(10, 4, stride))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("context", [1, 5, 16])
def test_stream_equals_one_full_forward(tiny_model, layout, context):
    model = tiny_model(**LAYOUTS[layout])
    docs = docs_of([23, 7, 2, 16], model.config.vocab_size)
    got = document_nll(model, docs, pad_id=0, context=context, mode="stream", batch_size=3)
    want = [full_nll(model, ids) for ids in docs]
    assert got == pytest.approx(want, rel=1e-10)


def test_streams_cache_grows_to_the_longest_document_and_no_further(tiny_model, monkeypatch):
    """Capacity doubles from 4 contexts as the stream goes on, up to the document (37 ids: 36 inputs), not to
    the next power of two (64)."""
    from mixcon.generation.cache import MixConCache

    model = tiny_model()
    sizes = []
    reserve = MixConCache.reserve

    def recording(cache, length):
        reserve(cache, length)
        sizes.append(cache.key_mask.shape[1])

    monkeypatch.setattr(MixConCache, "reserve", recording)
    docs = docs_of([37], model.config.vocab_size)
    got = document_nll(model, docs, pad_id=0, context=4, mode="stream")
    assert sizes and sizes[0] == 16 and sorted(set(sizes)) == [16, 32, 36]
    assert got == pytest.approx([full_nll(model, docs[0])], rel=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_window_holding_the_whole_document_equals_one_full_forward(tiny_model, layout):
    model = tiny_model(**LAYOUTS[layout])
    docs = docs_of([20, 5, 13], model.config.vocab_size)
    got = document_nll(model, docs, pad_id=0, context=32, batch_size=2)
    assert got == pytest.approx([full_nll(model, ids) for ids in docs], rel=1e-10)


def test_disjoint_windows_score_each_chunk_on_its_own(tiny_model):
    model = tiny_model()
    (ids,) = docs_of([23], model.config.vocab_size)
    # inputs ids[0:22] in chunks of 8 predict ids[1:23]; each chunk is a fresh forward
    want = sum(full_nll(model, ids[b:b + 9]) for b in range(0, 22, 8))
    assert document_nll(model, [ids], pad_id=0, context=8) == pytest.approx([want], rel=1e-10)


def test_stride_one_predicts_each_token_from_exactly_the_last_context_tokens(tiny_model):
    model = tiny_model()
    (ids,) = docs_of([17], model.config.vocab_size)
    context, want = 5, 0.0
    x = torch.tensor(ids)
    with torch.no_grad():
        for j in range(len(ids) - 1):  # predict ids[j + 1] from inputs [max(0, j - context + 1), j]
            logits = model(x[None, max(0, j - context + 1):j + 1]).logits[0, -1]
            want += float(F.cross_entropy(logits[None], x[j + 1:j + 2], reduction="sum"))
    got = document_nll(model, [ids], pad_id=0, context=context, stride=1, batch_size=4)
    assert got == pytest.approx([want], rel=1e-10)
    assert got != pytest.approx(full_nll(model, ids), rel=1e-6)  # the truncated context matters


@pytest.mark.parametrize("mode", ["window", "stream"])
def test_batch_size_and_padding_value_change_nothing(tiny_model, mode):
    model = tiny_model()
    docs = docs_of([30, 3, 11, 19, 2], model.config.vocab_size)
    one = document_nll(model, docs, pad_id=0, context=6, stride=4 if mode == "window" else None, mode=mode,
                       batch_size=1)
    many = document_nll(model, docs, pad_id=7, context=6, stride=4 if mode == "window" else None, mode=mode,
                        batch_size=8)
    assert many == pytest.approx(one, rel=1e-10)


def test_evaluate_texts_counts_bytes_and_bits_with_the_byte_tokenizer(tiny_model):
    model = tiny_model(dtype=torch.float32, vocab_size=ByteTokenizer.vocab_size).train()
    texts = ["héllo wörld, " * 3, "", "second document\n", " \n"]  # a text of whitespace is a document too
    score = evaluate_texts(model, ByteTokenizer(), texts, context=16, mode="stream")
    assert model.training  # restored
    n_bytes = sum(len(t.encode()) for t in texts)
    assert (score.documents, score.tokens, score.bytes) == (3, n_bytes, n_bytes)
    tok = ByteTokenizer()
    docs = [[tok.eos_id, *tok.encode(t)] for t in texts if t]
    assert score.nll == pytest.approx(sum(full_nll(model.eval(), ids) for ids in docs), rel=1e-5)
    assert score.bits_per_byte == pytest.approx(score.loss / math.log(2))  # one token per byte
    assert score.perplexity == pytest.approx(math.exp(score.loss))
    assert set(score.as_dict()) >= {"loss", "perplexity", "bits_per_byte", "tokens_per_s", "bytes"}


def test_bad_arguments_name_the_field(tiny_model):
    model = tiny_model()
    docs = docs_of([5], model.config.vocab_size)
    with pytest.raises(ValueError, match="mode='full': must be one of window, stream"):
        document_nll(model, docs, pad_id=0, mode="full")
    with pytest.raises(ValueError, match="context=0"):
        document_nll(model, docs, pad_id=0, context=0)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        document_nll(model, docs, pad_id=0, batch_size=0)
    with pytest.raises(ValueError, match=r"stride=9 must be in \[1, context=8\]"):
        document_nll(model, docs, pad_id=0, context=8, stride=9)
    with pytest.raises(ValueError, match=r"stride=4: windows only \(mode='window'\)"):
        document_nll(model, docs, pad_id=0, mode="stream", stride=4)
    with pytest.raises(ValueError, match="at least one token to score"):
        document_nll(model, [[3]], pad_id=0)


def test_nothing_to_score_is_an_error_not_a_perfect_score(tiny_model):
    model = tiny_model(vocab_size=ByteTokenizer.vocab_size)
    for texts in ([], ["", ""]):
        with pytest.raises(ValueError, match=r"evaluate_texts: no text to score"):
            evaluate_texts(model, ByteTokenizer(), texts)
    empty = TextScore(nll=0.0, tokens=0, bytes=0, documents=0, seconds=0.0)
    assert all(math.isnan(x) for x in (empty.loss, empty.perplexity, empty.bits_per_byte))


def test_a_scores_derived_figures():
    score = TextScore(nll=80.0, tokens=10, bytes=40, documents=1, seconds=2.0)
    assert score.perplexity == pytest.approx(math.exp(8.0)) and score.bits_per_byte == pytest.approx(2 / math.log(2))
    assert score.as_dict()["tokens_per_s"] == 5.0
    instant = TextScore(nll=80.0, tokens=10, bytes=40, documents=1, seconds=0.0)  # a clock that did not move
    assert instant.as_dict()["tokens_per_s"] == 0.0
    huge = TextScore(nll=10_000.0, tokens=10, bytes=40, documents=1, seconds=2.0)  # loss 1,000 nats: no overflow
    assert huge.perplexity == math.exp(700.0)


def test_real_text_window_and_stream_agree_when_the_window_holds_everything(tiny_model, shakespeare_path):
    model = tiny_model(dtype=torch.float32, vocab_size=ByteTokenizer.vocab_size)
    text = shakespeare_path.read_text()[:3000]
    paragraphs = [p for p in text.split("\n\n") if p][:6]
    window = evaluate_texts(model, ByteTokenizer(), paragraphs, context=4096, batch_size=3)
    stream = evaluate_texts(model, ByteTokenizer(), paragraphs, context=64, mode="stream", batch_size=2)
    assert window.tokens == stream.tokens == sum(len(p.encode()) for p in paragraphs)
    assert window.nll == pytest.approx(stream.nll, rel=1e-5)
    assert 7.0 < window.bits_per_byte < 9.5  # an untrained model: about log2(259) = 8.0 bits per byte


@pytest.mark.parametrize("mode", ["window", "stream"])
def test_the_progress_bar_counts_each_scored_token_once(tiny_model, capsys, mode):
    """progress=True shows a bar that ends at the documents' predictions, each counted once however the
    windows overlap (stride 2 in windows of 5: most inputs are in several windows); none without it."""
    model = tiny_model()
    docs = docs_of([30, 3, 11], model.config.vocab_size)
    stride = 2 if mode == "window" else None
    document_nll(model, docs, pad_id=0, context=5, stride=stride, mode=mode, batch_size=2, progress=True)
    assert "41/41 [" in capsys.readouterr().err  # 29 + 2 + 10 predictions
    document_nll(model, docs, pad_id=0, context=5, stride=stride, mode=mode, batch_size=2)
    assert "41/41" not in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["window", "stream"])
def test_evaluate_texts_runs_batch_size_rows_side_by_side(tiny_model, mode):
    """batch_size reaches the forwards: 5 documents (each one row: the window holds it) in rows of 2, 2, 1, or
    all 5 at once."""
    model = tiny_model(vocab_size=ByteTokenizer.vocab_size)
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    texts = ["one", "second text", "3", "the fourth", "fifth and last"]
    for batch_size, want in [(2, [2, 2, 1]), (5, [5])]:
        rows.clear()
        evaluate_texts(model, ByteTokenizer(), texts, context=64, mode=mode, batch_size=batch_size)
        assert rows == want
