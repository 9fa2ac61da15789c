"""BPE and bytes tokenizers: round trips, split digits, specials, tokenizer.json compatibility."""

from __future__ import annotations

import functools
import json
import random
import re

import pytest
import tokenizers
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mixcon.data import BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe_tokenizer
from mixcon.data.tokenizer import MAX_WORD, ROUND_TRIP_PROBE, SPECIAL_TOKENS, _byte_level_chars

# Any Unicode scalar value, with emoji (incl. modifiers and ZWJ), CJK, control characters and spaces over-weighted.
SAMPLES = list("😀👍🏽\u200d中文字東京\x00\x07\x1b\x7f\t\r\n \u00a0\ufeff2")
TEXT = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(SAMPLES)))
SPECIAL_SPELLINGS = "<|bos|>hello<|eos|> <|pad|><|eos|>"


def text_cases(test):
    """Hypothesis text plus the edge cases every round-trip test must see."""
    for text in ("", " leading space", "  two\n\n  spaces  ", SPECIAL_SPELLINGS):
        test = example(text)(test)
    return settings(max_examples=300, deadline=None)(given(TEXT)(test))


def specials(tok) -> set[int]:
    return {tok.bos_id, tok.eos_id, tok.pad_id}


@text_cases
def test_bytes_round_trip_and_no_specials(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert not specials(tok) & set(ids)


@text_cases
def test_decode_is_decode_bytes_read_as_utf8_as_tokenizers_decodes(bpe, text):
    for tok in (ByteTokenizer(), bpe):
        ids = [*tok.encode(text), tok.eos_id, *tok.encode(text)[:3]]  # a special, and maybe a cut character
        assert tok.decode(ids) == tok.decode_bytes(ids).decode("utf-8", errors="replace")
        assert tok.decode_bytes(tok.encode(text)) == text.encode()
        assert tok.decode(ids) == tok.to_tokenizers().decode(ids, skip_special_tokens=True)


def test_added_tokens_stand_for_their_text():
    """Ordinary tokens added with `add_tokens` ("café"): their UTF-8 bytes (tokenizers' byte-level decoder would
    read é as the byte 0xE9), so decoding and bits per byte stay exact."""
    raw = train_bpe_tokenizer(["some plain text to learn from " * 20], 300).to_tokenizers()
    raw.add_tokens(["café", "ñandú"])
    tok = BPETokenizer(raw)
    text = "un café y un ñandú"
    ids = tok.encode(text)
    assert raw.token_to_id("café") in ids and tok.decode(ids) == text and tok.decode_bytes(ids) == text.encode()
    assert sum(tok.token_bytes()[i] for i in ids) == len(text.encode())


def test_long_runs_of_one_character_class_are_cut_for_training():
    """A 100K-letter line is not one 100K-character word (BPE training time grows with its square): no token
    spans more than MAX_WORD characters (and the space before them), and the text still round-trips; ordinary words
    are split as before."""
    text = "a" * 100_000 + "\n" + " " * 1_000 + "ACGT" * 5_000
    tok = train_bpe_tokenizer([text], 400)
    assert max(tok.token_bytes()) <= MAX_WORD + 1  # (a piece keeps the space before it)
    assert tok.decode(tok.encode(text)) == text
    pieces = tok.to_tokenizers().pre_tokenizer.pre_tokenize_str("see https://example.com/a_long_module_name.py")
    assert [p for p, _ in pieces] == ["see", "Ġhttps", "://", "example", ".", "com", "/", "a", "_", "long", "_",
                                      "module", "_", "name", ".", "py"]


def test_a_byte_level_bpe_with_more_special_tokens_in_its_vocabulary_loads(bpe):
    """A trainer given more special tokens puts them in the model's vocabulary: they stand for no bytes."""
    spec = json.loads(bpe.to_tokenizers().to_str())
    new_id = len(spec["model"]["vocab"])  # (the vocabulary holds BOS/EOS/PAD already)
    spec["model"]["vocab"]["<|im start|>"] = new_id
    spec["added_tokens"].append({"id": new_id, "content": "<|im start|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    tok = BPETokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))
    assert tok.token_bytes()[new_id] == 0 and tok.decode([new_id, *tok.encode("hi")]) == "hi"


def test_tokenizers_that_are_not_byte_level_are_refused(bpe):
    spec = json.loads(bpe.to_tokenizers().to_str())
    for change, problem in (({"normalizer": {"type": "NFKC"}}, "it normalises text (NFKC)"),
                            ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                                                "split": True}}, "its pre-tokenizer is not ByteLevel"),
                            ({"decoder": None}, "its decoder is not ByteLevel")):
        odd = tokenizers.Tokenizer.from_str(json.dumps({**spec, **change}))
        with pytest.raises(ValueError, match="tokenizer is not a byte-level BPE: " + re.escape(problem)):
            BPETokenizer(odd)
    spec["model"]["vocab"]["▁the"] = len(spec["model"]["vocab"]) + 10
    with pytest.raises(ValueError, match=r"its vocabulary has token '▁the', not made of byte-level characters"):
        BPETokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


def test_a_bpe_with_dropout_is_refused(bpe):
    """BPE dropout (subword regularisation) draws merges at random: the same text, different ids each time."""
    spec = json.loads(bpe.to_tokenizers().to_str())
    spec["model"]["dropout"] = 0.1
    with pytest.raises(ValueError, match=r"tokenizer: its BPE has dropout=0.1: merges drawn at random"):
        BPETokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


def test_an_added_token_that_swallows_whitespace_is_refused(bpe):
    """An added token with lstrip / rstrip drops the spaces beside it when encoding ("say  hello  there" came back
    as "sayhellothere"); without either, the text comes back whole."""
    for strip in ({"lstrip": True}, {"rstrip": True}, {}):
        raw = bpe.to_tokenizers()
        raw.add_tokens([tokenizers.AddedToken("hello", **strip)])
        if strip:
            with pytest.raises(ValueError, match=r"added token 'hello' swallows the whitespace beside it"):
                BPETokenizer(raw)
        else:
            tok = BPETokenizer(raw)
            ids = tok.encode("say  hello  there")
            assert tok.decode(ids) == "say  hello  there" and sum(tok.token_bytes()[i] for i in ids) == 17


def test_byte_level_tokenizers_that_lose_or_add_bytes_are_refused(bpe):
    """Byte-level in layout but not byte for byte: a space added before each text, whitespace dropped by another
    pre-tokenizer, byte symbols missing from the vocabulary (a BPE trained without the initial alphabet)."""
    spec = json.loads(bpe.to_tokenizers().to_str())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    back = "it does not give text back as it was: 'def f(x):"
    for pre, problem in (({**byte_level, "add_prefix_space": True}, back),
                         ({"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, byte_level]}, back)):
        odd = tokenizers.Tokenizer.from_str(json.dumps({**spec, "pre_tokenizer": pre}))
        with pytest.raises(ValueError, match="tokenizer is not a byte-level BPE: " + re.escape(problem)):
            BPETokenizer(odd)
    del spec["model"]["vocab"]["Ā"]  # byte 0x00
    with pytest.raises(ValueError, match=r"its vocabulary lacks 1 of the 256 byte symbols \(byte 0x00 first\)"):
        BPETokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


def test_ordinary_added_tokens_pass_the_round_trip_check(bpe):
    """Added tokens that are not special (whitespace runs as in CodeGen, whole words) stand for their UTF-8 text,
    as the tokenizer decodes them: the byte-for-byte check reads them so (it took their text as byte symbols)."""
    raw = bpe.to_tokenizers()
    raw.add_tokens([tokenizers.AddedToken("    ", normalized=False), "Zürich"])
    tok = BPETokenizer(raw)
    text = "def f():\n    return Zürich"
    assert tok.decode(tok.encode(text)) == text and raw.token_to_id("Zürich") in tok.encode(text)


@text_cases
def test_bpe_round_trip_and_no_specials(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert not specials(bpe) & set(ids)
    assert all(0 <= i < bpe.vocab_size for i in ids)


@text_cases
def test_token_bytes_add_up_to_the_texts_utf8_bytes(bpe, text):
    """What bits per byte divides by: each id's bytes, summed over an encoding, are the text's own."""
    for tok in (ByteTokenizer(), bpe):
        table = tok.token_bytes()
        assert len(table) == tok.vocab_size and all(table[i] == 0 for i in specials(tok))
        assert sum(table[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_bytes_ids_and_specials():
    tok = ByteTokenizer()
    assert tok.encode("é") == [0xC3, 0xA9]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.name) == (259, 256, 257, 258, "bytes")
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id]) == "hi"
    for bad in (259, -1):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside the bytes vocabulary \[0, 259\)"):
            tok.decode([bad])


@functools.cache
def bytes_as_tokenizers() -> tokenizers.Tokenizer:
    return ByteTokenizer().to_tokenizers()


def test_byte_level_chars_are_those_of_the_byte_level_pre_tokenizer():
    chars = _byte_level_chars()
    assert len(set(chars)) == 256 and set(chars) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    # Text whose UTF-8 holds every byte that UTF-8 can hold (all but C0, C1, F5-FF): ASCII, every 2-byte lead and
    # continuation byte, every 3- and 4-byte lead.
    text = "".join(map(chr, range(0x800))) + "".join(chr(0x1000 * k + 0x100) for k in range(1, 16))
    text += "".join(map(chr, (0x800, 0x10000, 0x40000, 0x80000, 0xC0000, 0x100000)))
    data = text.encode("utf-8")
    assert set(range(256)) - set(data) == {0xC0, 0xC1, *range(0xF5, 0x100)}
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    [(written, _)] = byte_level.pre_tokenize_str(text)
    assert written == "".join(chars[b] for b in data)


@text_cases
def test_bytes_as_a_tokenizers_tokenizer_has_the_same_ids(text):
    tok, backend = ByteTokenizer(), bytes_as_tokenizers()
    assert backend.encode(text, add_special_tokens=False).ids == tok.encode(text)  # specials' spellings as bytes
    assert backend.decode(tok.encode(text)) == text


def test_bytes_as_a_tokenizers_tokenizer_decodes_any_ids_as_bytes_do():
    tok, backend = ByteTokenizer(), bytes_as_tokenizers()
    assert backend.get_vocab_size() == tok.vocab_size
    assert [backend.token_to_id(t) for t in SPECIAL_TOKENS] == [tok.bos_id, tok.eos_id, tok.pad_id]
    rng = random.Random(0)
    for _ in range(500):  # mostly invalid UTF-8, with specials among the bytes
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert backend.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_a_lone_surrogate_is_named_with_its_position(bpe):
    for tok in (ByteTokenizer(), bpe):
        with pytest.raises(UnicodeEncodeError, match=r"'\\ud800' in position 2: surrogates not allowed"):
            tok.encode("ab\ud800c")


def test_bpe_decode_skips_specials_and_rejects_unknown_ids(bpe):
    assert bpe.decode([bpe.bos_id, *bpe.encode("x = 1"), bpe.eos_id, bpe.pad_id]) == "x = 1"
    for bad in (bpe.vocab_size, -1):  # (-1 read the last id's bytes)
        with pytest.raises(ValueError, match=rf"token id {bad} is outside the BPE vocabulary"):
            bpe.decode([bad])


def test_every_digit_is_its_own_token():
    # Text where a plain BPE would certainly merge "2024" and "12345": the split must come from the pre-tokenizer.
    tok = train_bpe_tokenizer(["in 2024 and 1999, x=12345 y=2024 z=2024\n"] * 300, vocab_size=400)
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    assert [tok.decode([i]) for i in tok.encode("x=12345")][-5:] == list("12345")


def test_bpe_vocabulary_has_no_multi_character_token_with_a_digit(bpe, tmp_path):
    vocab = json.loads(bpe.save(tmp_path).read_text())["model"]["vocab"]
    with_digits = [t for t in vocab if any(c.isdigit() for c in t) and len(t) > 1]
    assert with_digits == []
    assert len(vocab) == bpe.vocab_size


def test_bpe_specials_and_size(bpe):
    assert bpe.name == "bpe" and bpe.vocab_size == 1024
    assert len(specials(bpe)) == 3 and max(specials(bpe)) < bpe.vocab_size


def test_bpe_tokenizer_json_loads_unchanged_in_tokenizers_and_transformers(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = bpe.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    text = "def f(x):\n    return 2024 * x  # 東京 😀 <|eos|>\n"
    plain = text.replace("<|eos|>", "")  # loaded elsewhere, specials spelled in text are matched as specials
    raw = tokenizers.Tokenizer.from_file(str(path))
    assert raw.encode(plain, add_special_tokens=False).ids == bpe.encode(plain)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert hf.encode(plain, add_special_tokens=False) == bpe.encode(plain)
    assert hf.decode(bpe.encode(text), clean_up_tokenization_spaces=False) == text
    assert hf.convert_tokens_to_ids(["<|bos|>", "<|eos|>", "<|pad|>"]) == [bpe.bos_id, bpe.eos_id, bpe.pad_id]


def test_load_tokenizer_by_name_file_or_directory(bpe, tmp_path):
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    for spec in (bpe.save(tmp_path / "bpe"), tmp_path / "bpe", str(tmp_path / "bpe")):
        loaded = load_tokenizer(spec)
        assert isinstance(loaded, BPETokenizer)
        assert loaded.fingerprint() == bpe.fingerprint()
        assert loaded.encode("return 2024") == bpe.encode("return 2024")
    path = ByteTokenizer().save(tmp_path / "bytes")
    assert isinstance(load_tokenizer(path), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "bytes"), ByteTokenizer)


def test_fingerprints_tell_tokenizers_apart(bpe):
    other = train_bpe_tokenizer(["some other text, quite different\n"] * 50, vocab_size=300)
    prints = {bpe.fingerprint(), other.fingerprint(), ByteTokenizer().fingerprint()}
    assert len(prints) == 3
    assert ByteTokenizer().fingerprint() == ByteTokenizer().fingerprint()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected 'bytes', a tokenizer.json file, or a directory"):
        load_tokenizer(tmp_path / "nope")
    for bad in (b"{not json", b'{"model": "caf\xe9"}'):  # not JSON, not UTF-8
        (tmp_path / "bad.json").write_bytes(bad)
        with pytest.raises(ValueError, match=r"bad.json: not a tokenizer JSON file"):
            load_tokenizer(tmp_path / "bad.json")
    foreign = tokenizers.Tokenizer(tokenizers.models.BPE())
    foreign.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer.json: tokenizer lacks special token\(s\) <\|bos\|>"):
        load_tokenizer(tmp_path)


def test_train_errors():
    for small in (100, 258):  # 258: the bytes and two of the three specials
        with pytest.raises(ValueError, match=rf"vocab_size={small}: a byte-level BPE needs at least 259"):
            train_bpe_tokenizer(["text"], vocab_size=small)
    with pytest.raises(ValueError, match=r"no text to train the tokenizer on"):
        train_bpe_tokenizer([], vocab_size=300)
    assert train_bpe_tokenizer(["text"], vocab_size=259).vocab_size == 259  # the least: bytes and specials


def test_a_tokenizer_json_with_truncation_or_padding_encodes_whole_documents(bpe, tmp_path):
    """A tokenizer.json saved by a transformers tokenizer called with truncation=True / padding carries those
    settings: mixcon encodes every document whole and unpadded all the same."""
    text = "def f(x):\n    return 2024 * x\n" * 20
    raw = bpe.to_tokenizers()
    raw.enable_truncation(max_length=16)
    raw.enable_padding(pad_id=bpe.pad_id, pad_token="<|pad|>", length=24)
    raw.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(text) == bpe.encode(text) and len(bpe.encode(text)) > 24
    assert loaded.encode("Hi") == bpe.encode("Hi")


def test_specials_added_as_ordinary_tokens_are_refused(tmp_path):
    """Added with add_tokens, text spelling "<|eos|>" would encode to EOS: a document boundary inside text."""
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.add_tokens(list(SPECIAL_TOKENS))
    raw.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"has <\|bos\|>, <\|eos\|>, <\|pad\|> as ordinary tokens, not special"):
        load_tokenizer(tmp_path)


def test_mismatch_compares_what_ids_mean_not_files():
    """The bytes tokenizer as a tokenizer.json means the same ids; another vocabulary, other specials or an id
    that stands for other bytes is named."""
    from mixcon.data.tokenizer import mismatch

    exported = BPETokenizer(ByteTokenizer().to_tokenizers())
    assert exported.fingerprint() != ByteTokenizer().fingerprint()
    assert mismatch(ByteTokenizer(), exported) is None
    text = "the cat sat on the mat, the end. " * 50
    a = train_bpe_tokenizer([text], vocab_size=265)
    assert mismatch(a, BPETokenizer(tokenizers.Tokenizer.from_str(a._tok.to_str()))) is None
    assert mismatch(a, ByteTokenizer()) == "259 ids, not 265"
    b = train_bpe_tokenizer(["zzz yyy xxx www vvv uuu " * 50], vocab_size=265)
    assert b.vocab_size == a.vocab_size
    assert mismatch(a, b).startswith("id ")

    class Swapped(ByteTokenizer):  # EOS and PAD exchanged: every id decodes as before (specials decode to b"")
        eos_id, pad_id = 258, 257

    assert mismatch(ByteTokenizer(), Swapped()) == "eos_id 258, not 257"

    class OtherBos(ByteTokenizer):  # BOS on the PAD id: only the specials' ids tell
        bos_id = 258

    assert mismatch(ByteTokenizer(), OtherBos()) == "bos_id 258, not 256"

    class OtherPad(ByteTokenizer):  # PAD on BOS's id
        pad_id = 256

    class LastId(ByteTokenizer):  # only the last id means other bytes
        def decode_bytes(self, ids):
            return b"?" if list(ids) == [self.vocab_size - 1] else super().decode_bytes(ids)

    assert mismatch(ByteTokenizer(), OtherPad()) == "pad_id 256, not 258"
    assert mismatch(ByteTokenizer(), LastId()) == "id 258 stands for b'?', not b''"


def test_mismatch_names_byte_ids_in_another_order():
    """A byte-level BPE whose 256 byte ids are ordered otherwise (as GPT-2's are: printable bytes first) has the
    same size and specials as the bytes tokenizer and loads, but its ids mean other bytes: named at the first."""
    from mixcon.data.tokenizer import BYTE_OF, mismatch

    vocab = dict(BYTE_OF)
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # ids 97 and 98 exchanged
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    swapped = BPETokenizer(tok)
    assert swapped.encode("ab") == [98, 97] and swapped.decode([98, 97]) == "ab"
    assert mismatch(ByteTokenizer(), swapped) == "id 97 stands for b'b', not b'a'"
    assert mismatch(swapped, BPETokenizer(swapped.to_tokenizers())) is None


def test_a_json_file_that_is_no_tokenizer_is_named(tmp_path):
    """JSON that `tokenizers` cannot read (another version's format, another program's file): a ValueError naming
    the file (tokenizers raises a bare Exception)."""
    for text in ('{"version": "9.0"}', "[1, 2]", '{"model": {"type": "NoSuchModel"}}'):
        (tmp_path / "tokenizer.json").write_text(text)
        with pytest.raises(ValueError, match=r"tokenizer\.json: not a Hugging Face tokenizer\.json \(.+\)"):
            load_tokenizer(tmp_path)


def test_a_tokenizer_whose_model_is_not_bpe_is_refused(bpe):
    """A WordLevel model over the same byte-level vocabulary would not split unknown words into bytes."""
    spec = json.loads(bpe.to_tokenizers().to_str())
    spec["model"] = {"type": "WordLevel", "vocab": spec["model"]["vocab"], "unk_token": "<|pad|>"}
    with pytest.raises(ValueError, match=r"tokenizer is not a byte-level BPE: its model is WordLevel, not BPE"):
        BPETokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


def test_tokenizers_pickle_to_the_same_ids_and_say_what_they_are(bpe):
    """Pickled for parallel shard workers (a spawned process): the copy encodes and decodes as the original."""
    import pickle

    copy = pickle.loads(pickle.dumps(bpe))
    assert isinstance(copy, BPETokenizer) and copy.fingerprint() == bpe.fingerprint()
    assert copy.encode(ROUND_TRIP_PROBE) == bpe.encode(ROUND_TRIP_PROBE)
    assert (copy.vocab_size, copy.eos_id, copy.token_bytes()) == (bpe.vocab_size, bpe.eos_id, bpe.token_bytes())
    assert repr(copy) == f"BPETokenizer(vocab_size={bpe.vocab_size})"
    assert repr(pickle.loads(pickle.dumps(ByteTokenizer()))) == "ByteTokenizer(vocab_size=259)"


def test_encoding_what_is_not_text_is_a_type_error(bpe):
    for not_text in (b"bytes", None, 3):
        with pytest.raises(TypeError):
            bpe.encode(not_text)
