"""Tokenizers: a byte-level BPE with split digits (Hugging Face `tokenizers`) and raw UTF-8 bytes.

Both share one interface: `encode` (plain text only, never specials), `decode` (skips specials),
`decode_bytes` (the same before the bytes become text: streaming through an incremental UTF-8 decoder),
`vocab_size`, `bos_id` / `eos_id` / `pad_id`, `name`, `fingerprint()`, `token_bytes()` (the UTF-8 bytes each
id stands for: bits per byte), `save(directory)` and `to_tokenizers()` (the same ids as a
`tokenizers.Tokenizer`, the form transformers builds on). `mismatch` tells whether two tokenizers' ids mean the
same.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from mixcon.io import write_text_atomic

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
FILENAME = "tokenizer.json"
MAX_WORD = 64  # characters: longer runs of one character class are cut for BPE training and encoding
LONG_RUNS = (r" ?\p{L}", r" ?\p{N}", r" ?[^\s\p{L}\p{N}]", r"\s")  # the classes (a leading space) MAX_WORD cuts
_BYTES_MARKER = "mixcon_bytes_tokenizer"  # key of the small JSON that ByteTokenizer.save writes


def _byte_level_chars() -> list[str]:
    """The character that `tokenizers`' ByteLevel pre-tokenizer writes for each byte 0-255: printable Latin-1
    bytes stand for themselves, the other 68 for the code points from 256 up, in byte order."""
    printable = {b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF}
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


BYTE_OF = {char: byte for byte, char in enumerate(_byte_level_chars())}  # a byte-level token's character -> byte
# Text that a tokenizer must give back byte for byte: no space first (ByteLevel's add_prefix_space adds one), runs
# of spaces, tabs, line ends, every printable ASCII character, letters beyond ASCII, a long run of one letter.
ROUND_TRIP_PROBE = ("def f(x):\n\treturn  x**2 + 1_000  # Zürich, 東京, 🙂\r\n\n" + "".join(map(chr, range(32, 127)))
                    + " " + "a" * 70 + "  \u00a0end ")


class ByteTokenizer:
    """Tokenizer-free modelling: ids 0-255 are UTF-8 bytes, then BOS, EOS, PAD."""

    name = "bytes"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes the ids stand for (none for BOS, EOS, PAD): text once decoded as UTF-8."""
        data = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the bytes vocabulary [0, {self.vocab_size})")
            if i < 256:
                data.append(i)
        return bytes(data)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes of text that each id stands for: 1 for a byte, 0 for BOS, EOS, PAD."""
        return [1] * 256 + [0] * (self.vocab_size - 256)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self._config()).encode()).hexdigest()

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self._config(), indent=2) + "\n")
        return path

    def to_tokenizers(self) -> Tokenizer:
        """The same ids as a `tokenizers.Tokenizer`: a ByteLevel BPE without merges, so each byte is its own
        token, then BOS / EOS / PAD (special-token text encoded as ordinary bytes)."""
        tok = Tokenizer(models.BPE(vocab=dict(BYTE_OF), merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids 256, 257, 258 in this order
        tok.encode_special_tokens = True
        return tok

    def _config(self) -> dict[str, int]:
        return {_BYTES_MARKER: 1, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


def _literal_copy(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` that encodes text spelling a special token ("<|eos|>") as ordinary characters,
    never as the special id, and whole: without the truncation or padding a tokenizer.json may carry (saved
    by a transformers tokenizer called with truncation=True), which would cut and pad every document."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = True
    copy.no_truncation()
    copy.no_padding()
    return copy


def _check_byte_level(tok: Tokenizer, special: set[str]) -> None:
    """Refuse a tokenizer whose layout cannot give exact UTF-8 bytes: mixcon needs every text encodable and
    decoded as it was, and bits per byte from each token's bytes (a byte-level BPE with no normalizer, every byte
    symbol in its vocabulary; `BPETokenizer` then checks a text's round trip, decoding as it does). `special`: the
    text of its special tokens, which stand for no bytes."""
    spec = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    problems = []
    if spec.get("normalizer"):
        problems.append(f"it normalises text ({spec['normalizer'].get('type')})")
    if not any(p.get("type") == "ByteLevel" for p in pres):
        problems.append("its pre-tokenizer is not ByteLevel")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        problems.append("its decoder is not ByteLevel")
    if spec.get("model", {}).get("type") != "BPE":
        problems.append(f"its model is {spec.get('model', {}).get('type')}, not BPE")
    vocab = spec.get("model", {}).get("vocab", {})
    odd = next((token for token in vocab if token not in special and any(c not in BYTE_OF for c in token)), None)
    if odd is not None:
        problems.append(f"its vocabulary has token {odd!r}, not made of byte-level characters")
    lacking = [byte for char, byte in BYTE_OF.items() if char not in vocab]
    if lacking:
        problems.append(f"its vocabulary lacks {len(lacking)} of the 256 byte symbols (byte 0x{lacking[0]:02x} first)")
    if problems:
        _not_byte_level(problems)
    dropout = spec["model"].get("dropout")
    if dropout:
        raise ValueError(f"tokenizer: its BPE has dropout={dropout}: merges drawn at random, so a text encodes "
                         "differently each time (token shards, validation and evaluation would not repeat); set "
                         "model.dropout to null in its tokenizer.json")
    stripping = [t["content"] for t in spec.get("added_tokens", [])
                 if t.get("content") not in special and (t.get("lstrip") or t.get("rstrip"))]
    if stripping:
        raise ValueError(f"tokenizer: its added token {stripping[0]!r} swallows the whitespace beside it (lstrip / "
                         "rstrip), whose bytes would be lost from the text; set lstrip and rstrip to false in its "
                         "tokenizer.json")


def _not_byte_level(problems: list[str]) -> None:
    raise ValueError("tokenizer is not a byte-level BPE: " + "; ".join(problems) + " (mixcon needs every text "
                     "encoded and decoded exactly, byte for byte; train one with train_bpe_tokenizer)")


class BPETokenizer:
    """A byte-level BPE from a `tokenizers.Tokenizer` that has the BOS / EOS / PAD special tokens."""

    name = "bpe"

    def __init__(self, tokenizer: Tokenizer):
        self._tok = _literal_copy(tokenizer)  # a private copy, with a setting changed
        ids = {token: self._tok.token_to_id(token) for token in SPECIAL_TOKENS}
        added = self._tok.get_added_tokens_decoder()
        special_ids = {i for i, token in added.items() if token.special}  # ids that stand for no text
        special = {added[i].content for i in special_ids}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special token(s) {', '.join(missing)}; "
                             f"mixcon needs {', '.join(SPECIAL_TOKENS)} (train one with train_bpe_tokenizer)")
        plain = [token for token in SPECIAL_TOKENS if token not in special]
        if plain:  # text spelling them would encode to their ids: a document boundary in the middle of text
            raise ValueError(f"tokenizer has {', '.join(plain)} as ordinary tokens, not special ones (added with "
                             "add_tokens, not add_special_tokens); mixcon needs them special, so that text "
                             "spelling them stays text (train one with train_bpe_tokenizer)")
        _check_byte_level(self._tok, special)
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # The bytes each id stands for: none for a special token, an ordinary added token's (add_tokens) text
        # in UTF-8, one byte per character of a vocabulary token.
        self._bytes = [b"" if i in special_ids else
                       added[i].content.encode() if i in added else
                       bytes(BYTE_OF[c] for c in self._tok.id_to_token(i) or "") for i in range(self.vocab_size)]
        back = self.decode_bytes(self.encode(ROUND_TRIP_PROBE))  # (add_prefix_space; whitespace dropped)
        if back != ROUND_TRIP_PROBE.encode():
            _not_byte_level([f"it does not give text back as it was: {ROUND_TRIP_PROBE[:24]!r}... comes back as "
                             f"{back.decode(errors='replace')[:24]!r}..."])

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:
            if isinstance(text, str):  # a lone surrogate: UnicodeEncodeError (a ValueError) names it and where
                text.encode("utf-8")
            raise

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `decode_bytes` (bytes that form no character as U+FFFD, as `tokenizers` decodes them; an
        added token's text whole, where `tokenizers`' byte-level decoder would read its characters as bytes)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The UTF-8 bytes the ids stand for (none for special tokens): `decode` before the bytes become text."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the BPE vocabulary [0, {self.vocab_size})")
        return b"".join(map(self._bytes.__getitem__, ids))

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes of text that each id stands for (0 for special tokens)."""
        return [len(b) for b in self._bytes]

    def fingerprint(self) -> str:
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, self._tok.to_str(pretty=True))
        return path

    def to_tokenizers(self) -> Tokenizer:
        """A copy as a `tokenizers.Tokenizer` (special-token text encoded as ordinary characters)."""
        return _literal_copy(self._tok)

    def __getstate__(self) -> str:  # pickling (parallel shard workers) goes through the JSON
        return self._tok.to_str()

    def __setstate__(self, state: str) -> None:
        self.__init__(Tokenizer.from_str(state))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE (every digit its own token, BOS/EOS/PAD) of at most `vocab_size` tokens.

    The result is smaller than `vocab_size` when the text runs out of pairs to merge.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {minimum} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        # Runs of MAX_WORD characters of one of the byte-level split's classes (letters, digits, other symbols,
        # whitespace) cut into pieces, a leading space kept with the first: BPE training time grows with the square
        # of a word's length (a 4 MB line of DNA would take about an hour). Shorter words are split as before.
        pre_tokenizers.Split(Regex("|".join(f"{one}{{{MAX_WORD}}}" for one in LONG_RUNS)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in texts:
            seen += len(text)
            yield text

    tok.train_from_iterator(counted(), trainer)
    if seen == 0:
        raise ValueError("no text to train the tokenizer on: the texts are empty")
    return BPETokenizer(tok)


AnyTokenizer = ByteTokenizer | BPETokenizer


def mismatch(expected: AnyTokenizer, given: AnyTokenizer) -> str | None:
    """How an id of `given` means something else than in `expected` (vocabulary size, BOS / EOS / PAD, the bytes
    of an id), or None when every id means the same, whatever the two files look like."""
    if given.vocab_size != expected.vocab_size:
        return f"{given.vocab_size} ids, not {expected.vocab_size}"
    for name in ("bos_id", "eos_id", "pad_id"):
        if getattr(given, name) != getattr(expected, name):
            return f"{name} {getattr(given, name)}, not {getattr(expected, name)}"
    for i in range(expected.vocab_size):
        if (text := given.decode_bytes([i])) != (wanted := expected.decode_bytes([i])):
            return f"id {i} stands for {text!r}, not {wanted!r}"
    return None


def load_tokenizer(spec: str | os.PathLike) -> AnyTokenizer:
    """'bytes', a tokenizer.json (BPE or the bytes marker that ByteTokenizer.save writes), or a directory with one."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(spec)!r}: expected 'bytes', a {FILENAME} file, "
                                f"or a directory containing {FILENAME}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a tokenizer JSON file ({e})") from e
    if isinstance(data, dict) and _BYTES_MARKER in data:
        return ByteTokenizer()
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from e
    try:
        return BPETokenizer(tokenizer)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
