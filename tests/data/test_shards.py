"""Token shards: same stream as direct encoding, deterministic document split, reuse, atomic and checked builds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mixcon.data import (
    ByteTokenizer,
    Corpus,
    ShardDataset,
    ShardError,
    prepare_shards,
    train_bpe_tokenizer,
    training_documents,
)
from mixcon.data import shards as shards_module
from mixcon.data.shards import token_dtype


def build(corpus, tok, out, **kwargs) -> ShardDataset:
    return prepare_shards(corpus, tok, out, progress=False, **kwargs)


def documents_of(ds: ShardDataset, split: str, tok) -> list[str]:
    """Cut a split's stream at EOS and decode each piece."""
    stream = np.asarray(ds.tokens(split)).tolist()
    assert not stream or stream[-1] == tok.eos_id
    pieces, start = [], 0
    for i, t in enumerate(stream):
        if t == tok.eos_id:
            pieces.append(tok.decode(stream[start:i]))
            start = i + 1
    return pieces


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_shakespeare_shards_equal_encoding_the_file(shakespeare_path, tmp_path, kind):
    text = shakespeare_path.read_bytes().decode("utf-8")
    tok = ByteTokenizer() if kind == "bytes" else train_bpe_tokenizer([text[:200_000]], vocab_size=2048)
    ds = build(Corpus.from_spec(str(shakespeare_path)), tok, tmp_path, val_fraction=0, workers=2)
    assert np.array_equal(ds.train, np.array([*tok.encode(text), tok.eos_id]))
    assert len(ds.val) == 0 and ds.train.dtype == np.uint16
    split = ds.index["splits"]["train"]
    assert (split["documents"], split["bytes"], split["tokens"]) == (1, len(text.encode()), len(ds.train))


def test_documents_are_split_whole_in_order_with_eos_after_each(tmp_path, bpe, random_documents, write_documents):
    docs = random_documents(200)
    ds = build(Corpus.from_spec(str(write_documents(tmp_path / "c", docs))), bpe, tmp_path / "s", val_fraction=0.1)
    train, val = documents_of(ds, "train", bpe), documents_of(ds, "val", bpe)
    total, largest = (f(len(d.encode()) for d in docs) for f in (sum, max))
    val_bytes = sum(len(d.encode()) for d in val)
    assert 0.1 * total - largest < val_bytes <= 0.1 * total and sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)] and val == [d for d in docs if d in set(val)]
    for split, pieces in (("train", train), ("val", val)):
        info = ds.index["splits"][split]
        assert info["documents"] == len(pieces) and info["tokens"] == len(ds.tokens(split))
        assert info["bytes"] == sum(len(d.encode()) for d in pieces)
        assert ds.bytes_per_token(split) == info["bytes"] / info["tokens"]


def test_split_is_deterministic_and_follows_the_seed(tmp_path, random_documents, write_documents):
    corpus = Corpus.from_spec(str(write_documents(tmp_path / "c", random_documents(100))))
    tok = ByteTokenizer()
    a, b = build(corpus, tok, tmp_path / "a", seed=1), build(corpus, tok, tmp_path / "b", seed=1)
    c = build(corpus, tok, tmp_path / "c2", seed=2)
    assert a.index["splits"] == b.index["splits"]
    assert np.array_equal(a.val, b.val) and np.array_equal(a.train, b.train)
    assert documents_of(a, "val", tok) != documents_of(c, "val", tok)
    total = sum(a.index["splits"][split]["bytes"] for split in ("train", "val"))
    assert 0 < a.index["splits"]["val"]["bytes"] <= 0.01 * total


@pytest.mark.parametrize("seed", range(6))
def test_the_split_holds_out_about_val_fraction_of_the_bytes(tmp_path, write_documents, seed):
    """A book and its short readme: 1 % of the bytes validates, i.e. the readme (not half of the documents, which
    would have sent the book to validation for some seeds and trained on the readme alone)."""
    book, readme = "a line of the book\n" * 5_000, "README: see the book\n"
    ds = build(Corpus.from_spec(str(write_documents(tmp_path / "c", [book, readme]))), ByteTokenizer(),
               tmp_path / "s", seed=seed)
    assert documents_of(ds, "train", ByteTokenizer()) == [book]
    assert documents_of(ds, "val", ByteTokenizer()) == [readme]
    three = [book, book.upper(), "x" * 2_000_000]  # none as small as 1 %: the smallest validates
    ds = build(Corpus.from_spec(str(write_documents(tmp_path / "d", three))), ByteTokenizer(), tmp_path / "t",
               seed=seed)
    assert documents_of(ds, "val", ByteTokenizer()) in ([book], [book.upper()])


def test_parallel_workers_give_the_same_shards(tmp_path, bpe, monkeypatch, random_documents, write_documents):
    monkeypatch.setattr(shards_module, "BATCH_BYTES", 2_000)  # many small batches across the processes
    corpus = Corpus.from_spec(str(write_documents(tmp_path / "c", random_documents(150))))
    one, two = build(corpus, bpe, tmp_path / "one", workers=1), build(corpus, bpe, tmp_path / "two", workers=2)
    assert one.index["splits"] == two.index["splits"]
    assert np.array_equal(one.train, two.train) and np.array_equal(one.val, two.val)


def test_reuse_if_unchanged_rebuild_if_tokenizer_or_corpus_changes(tmp_path, bpe, random_documents, write_documents):
    folder = write_documents(tmp_path / "c", random_documents(30))
    out = tmp_path / "s"
    first = build(Corpus.from_spec(str(folder)), ByteTokenizer(), out)
    shard = out / first.index["splits"]["train"]["file"]
    stamp = (shard.stat().st_ino, shard.stat().st_mtime_ns)
    again = build(Corpus.from_spec(str(folder)), ByteTokenizer(), out)
    assert again.reused and not first.reused
    assert (shard.stat().st_ino, shard.stat().st_mtime_ns) == stamp

    changed_tok = build(Corpus.from_spec(str(folder)), bpe, out)
    assert not changed_tok.reused and changed_tok.index["tokenizer"]["fingerprint"] == bpe.fingerprint()
    assert not shard.exists()  # the old build's shards are gone
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lock", "index.json", *(changed_tok.index["splits"][split]["file"] for split in ("train", "val"))])

    (folder / "00003.txt").write_text("an edited document")
    changed_corpus = build(Corpus.from_spec(str(folder)), bpe, out)
    assert not changed_corpus.reused and changed_corpus.index["key"] != changed_tok.index["key"]
    assert "an edited document" in documents_of(changed_corpus, "train", bpe) + documents_of(changed_corpus, "val", bpe)
    assert not build(Corpus.from_spec(str(folder)), bpe, out, seed=5).reused
    other_split = build(Corpus.from_spec(str(folder)), bpe, out, seed=5, val_fraction=0.3)
    assert not other_split.reused and other_split.index["val_fraction"] == 0.3


def test_a_second_build_of_a_folder_waits_for_the_first(tmp_path, capsys, random_documents, write_documents):
    """Two builds of one folder at once would delete each other's files: the second waits for the first's lock
    (its build time leaves the wait out); finished shards are reused without taking the lock (so a read-only
    folder of them serves too)."""
    import threading

    from mixcon.io import locked_directory

    corpus = Corpus.from_spec(str(write_documents(tmp_path / "c", random_documents(10))))
    out = tmp_path / "s"
    first = build(corpus, ByteTokenizer(), out)
    holding, release, done = threading.Event(), threading.Event(), []

    def other_build() -> None:  # holds the folder's lock, as a build in another process would
        with locked_directory(out, lambda pid: None):
            holding.set()
            release.wait(30)
            done.append(True)

    thread = threading.Thread(target=other_build)
    thread.start()
    holding.wait(30)
    threading.Timer(2.0, release.set).start()
    assert build(corpus, ByteTokenizer(), out).index == first.index  # finished: reused while the lock is held
    assert not done
    other = build(corpus, ByteTokenizer(), out, seed=1)  # another split: waits for the lock, then builds
    thread.join()
    assert done and not other.reused and other.index["seconds"] < 1.5  # (it waited 2 s)
    assert f"waiting for another process (pid {os.getpid()}) that builds shards in {out}" in capsys.readouterr().err


def test_the_split_fills_val_fraction_of_the_bytes_past_documents_too_large(tmp_path, write_documents):
    """Small and large documents: documents that would overshoot are passed over, the rest keep filling."""
    docs = [f"small {i} " + "s" * 490 for i in range(60)] + [f"large {i} " + "L" * 40_000 for i in range(60)]
    total = sum(len(d) for d in docs)
    for seed in range(4):
        ds = build(Corpus.from_spec(str(write_documents(tmp_path / f"c{seed}", docs))), ByteTokenizer(),
                   tmp_path / f"s{seed}", seed=seed)
        assert 0.01 * total - 500 < ds.index["splits"]["val"]["bytes"] <= 0.01 * total


def test_corrupt_or_truncated_shards_are_detected(tmp_path, random_documents, write_documents):
    corpus = Corpus.from_spec(str(write_documents(tmp_path / "c", random_documents(30))))
    out = tmp_path / "s"
    ds = build(corpus, ByteTokenizer(), out)
    shard = out / ds.index["splits"]["train"]["file"]
    data = bytearray(shard.read_bytes())
    del ds

    data[100] ^= 0xFF
    shard.write_bytes(data)
    with pytest.raises(ShardError, match=r"train\..*\.bin: content does not match the checksum in index.json"):
        ShardDataset(out)
    assert len(ShardDataset(out, verify=False).train) == len(data) // 2  # sizes are still right
    rebuilt = build(corpus, ByteTokenizer(), out)  # prepare rebuilds rather than reuses
    assert not rebuilt.reused and len(rebuilt.train) == len(data) // 2

    shard = out / rebuilt.index["splits"]["train"]["file"]
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(ShardError, match=r"train\..*\.bin: \d+ bytes, expected \d+ \(\d+ uint16 tokens\): truncated"):
        ShardDataset(out)

    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, "format": index["format"] + 1}))
    with pytest.raises(ShardError, match=rf"index.json: shard format {index['format'] + 1}, this mixcon reads "
                                         rf"{index['format']}; rebuild"):
        ShardDataset(out)
    (out / "index.json").write_text('{"format": 1, "dtype"')
    with pytest.raises(ShardError, match=r"index.json: corrupt index"):
        ShardDataset(out)
    (out / "index.json").unlink()
    with pytest.raises(ShardError, match=r"no index.json, so no complete shards"):
        ShardDataset(out)


def test_a_build_removes_only_shard_files(tmp_path, random_documents, write_documents):
    """Files of the user's in the folder stay, whatever their names; old shards and leftovers go."""
    out = tmp_path / "s"
    out.mkdir()
    theirs = ["train.final.bin", "val.backup.bin.gz", "notes.txt", "train.0123456789abcdef.bin.old"]
    for name in theirs:
        (out / name).write_text("mine")
    old = out / "val.0123456789abcdef.bin"
    old.write_bytes(b"")
    ds = build(Corpus.from_spec(str(write_documents(tmp_path / "c", random_documents(10)))), ByteTokenizer(), out)
    assert all((out / name).read_text() == "mine" for name in theirs) and not old.exists()
    assert all((out / ds.index["splits"][split]["file"]).exists() for split in ("train", "val"))


def test_skipped_files_are_recorded_when_one_document_is_left(tmp_path):
    """One readable file beside an unreadable one: the single text is split, and the index still names the skip."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("a line\n" * 100)
    (tmp_path / "c" / "b.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    ds = build(Corpus.from_spec(str(tmp_path / "c")), ByteTokenizer(), tmp_path / "s", val_fraction=0.3)
    assert ds.index["skipped"] == 1 and "b.txt: not UTF-8" in ds.index["corpus"]


def test_reused_shards_clear_the_leftovers_of_a_killed_build_but_not_a_running_ones(tmp_path, random_documents,
                                                                                    write_documents):
    import subprocess
    import sys

    folder = write_documents(tmp_path / "c", random_documents(10))
    out = tmp_path / "s"
    build(Corpus.from_spec(str(folder)), ByteTokenizer(), out)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    key = "0123456789abcdef"
    dead, live = out / f"train.{key}.bin.{int(gone.stdout)}.tmp", out / f"val.{key}.bin.{os.getpid()}.tmp"
    for path in (dead, live):
        path.write_bytes(b"partial")
    assert build(Corpus.from_spec(str(folder)), ByteTokenizer(), out).reused
    assert live.exists() and (not dead.exists() or os.name != "posix")


def test_an_interrupted_build_never_loads_as_complete(tmp_path, monkeypatch, random_documents, write_documents):
    folder = write_documents(tmp_path / "c", random_documents(30))
    out = tmp_path / "s"
    old = build(Corpus.from_spec(str(folder)), ByteTokenizer(), out)
    calls = []

    def interrupted(tok, docs, dtype):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return np.array([1, 2, 3], dtype=dtype)

    monkeypatch.setattr(shards_module, "BATCH_BYTES", 500)
    monkeypatch.setattr(shards_module, "encode_documents", interrupted)
    (folder / "00000.txt").write_text("changed, so a rebuild starts")
    for target in (out, tmp_path / "fresh"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            build(Corpus.from_spec(str(folder)), ByteTokenizer(), target, workers=1)
    survivor = ShardDataset(out)  # the previous build, whole and verified
    assert survivor.index == old.index and np.array_equal(survivor.train, old.train)
    assert not list(out.glob("*.tmp")) and not list((tmp_path / "fresh").glob("*.tmp"))
    with pytest.raises(ShardError, match=r"no index.json"):
        ShardDataset(tmp_path / "fresh")


def test_a_corpus_edited_between_its_scan_and_its_tokenising_is_refused(tmp_path, monkeypatch, random_documents,
                                                                         write_documents):
    """The shards' key hashes the scanned text: shards of an edited file under that key would be reused later as the
    unchanged corpus's."""
    folder = write_documents(tmp_path / "c", random_documents(8))
    scan = shards_module._scan

    def scan_then_edit(*args, **kwargs):
        result = scan(*args, **kwargs)
        (folder / "00003.txt").write_text("a much longer replacement " * 40)
        return result

    monkeypatch.setattr(shards_module, "_scan", scan_then_edit)
    with pytest.raises(RuntimeError, match="the corpus changed while the shards were being built"):
        build(Corpus.from_spec(str(folder)), ByteTokenizer(), tmp_path / "s", workers=1)
    assert not (tmp_path / "s" / "index.json").exists()


class WideTokenizer(ByteTokenizer):
    """Bytes, but with a vocabulary too large for uint16 and EOS at its top."""

    vocab_size, eos_id = 70_000, 69_999

    def fingerprint(self) -> str:
        return "wide"


def test_large_vocabularies_use_uint32(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    (tmp_path / "a.txt").write_text("hi")
    ds = build(Corpus.from_spec(str(tmp_path / "a.txt")), WideTokenizer(), tmp_path / "s", val_fraction=0)
    assert ds.train.dtype == np.uint32 and ds.train.tolist() == [104, 105, 69_999]


@pytest.mark.parametrize("seed", range(4))
def test_copies_of_a_text_go_to_one_split(tmp_path, write_documents, seed):
    """Twenty copies of one boilerplate text among twenty distinct documents: all train, or all validate."""
    docs = [f"document {i}: " + "word " * i for i in range(20)] + ["# licence header, the same in every file"] * 20
    ds = build(Corpus.from_spec(str(write_documents(tmp_path / "c", docs))), ByteTokenizer(), tmp_path / "s",
               val_fraction=0.5, seed=seed)
    train, val = documents_of(ds, "train", ByteTokenizer()), documents_of(ds, "val", ByteTokenizer())
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    copies = 20 * len(docs[-1])  # the largest text: all its copies together
    total = sum(len(d) for d in docs)
    assert 0.5 * total - copies < sum(len(d) for d in val) <= 0.5 * total  # about half of the bytes


def test_bad_inputs_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_bytes(b"\xff")
    with pytest.raises(ValueError, match=r"empty corpus: no documents in text .*skipped 1 \(.*b.txt: not UTF-8\)"):
        build(Corpus.from_spec(str(tmp_path / "empty")), ByteTokenizer(), tmp_path / "s")
    (tmp_path / "one.txt").write_text("x")
    one = Corpus.from_spec(str(tmp_path / "one.txt"))
    with pytest.raises(ValueError, match=r"val_fraction=0.01: the corpus is one document of 1 characters, too short"):
        build(one, ByteTokenizer(), tmp_path / "s")
    (tmp_path / "long.txt").write_text("ab\n" * 1000)
    with pytest.raises(ValueError, match=r"val_fraction=1e-06: of the single text's 3000 bytes, it holds out "
                                         r"none; use one in \[0.000333, 0.999667\], or 0 for no validation"):
        build(Corpus.from_spec(str(tmp_path / "long.txt")), ByteTokenizer(), tmp_path / "s", val_fraction=1e-6)
    (tmp_path / "emoji.txt").write_text("😀 and text")
    with pytest.raises(ValueError, match=r"no documents in .*emoji.txt \(1 file\) within its first max_bytes=3 "
                                         r"bytes \(they end inside the first character; allow more\)"):
        build(Corpus.from_spec(str(tmp_path / "emoji.txt")), ByteTokenizer(), tmp_path / "s", max_bytes=3)
    (tmp_path / "copies").mkdir()
    for name in "ab":
        (tmp_path / "copies" / f"{name}.txt").write_text("the same text")
    with pytest.raises(ValueError, match=r"val_fraction=0.01: the corpus is copies of a single text"):
        build(Corpus.from_spec(str(tmp_path / "copies")), ByteTokenizer(), tmp_path / "s")
    with pytest.raises(ValueError, match=r"val_fraction=1: must be in \[0, 1\)"):
        build(one, ByteTokenizer(), tmp_path / "s", val_fraction=1)
    assert not (tmp_path / "s").exists()


def test_max_bytes_and_index_contents(tmp_path, random_documents, write_documents):
    corpus = Corpus.from_spec(str(write_documents(tmp_path / "c", random_documents(50))))
    ds = build(corpus, ByteTokenizer(), tmp_path / "s", max_bytes=5_000, seed=3)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index == ds.index
    assert sum(s["bytes"] for s in index["splits"].values()) == 5_000
    assert index["tokenizer"] == {"name": "bytes", "fingerprint": ByteTokenizer().fingerprint(), "vocab_size": 259,
                                  "eos_id": 257}
    assert (index["seed"], index["max_bytes"], index["val_fraction"], index["dtype"]) == (3, 5_000, 0.01, "uint16")
    assert ds.vocab_size == 259 and ds.eos_id == 257
    assert "train" in ds.summary() and "bytes/token" in ds.summary()
    assert ds.summary().splitlines()[0].endswith(", cut at its first 5,000 bytes (--max-bytes)")  # said, not silent
    whole = build(corpus, ByteTokenizer(), tmp_path / "w")
    assert "cut at" not in whole.summary()


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_a_single_text_validates_on_its_end_from_a_line_start(tmp_path, tokenizer):
    """One text file (the commonest corpus): its last val_fraction, from the start of a line, is the validation
    split, the rest trains; nothing is lost or duplicated, and the split is the same on every build."""
    lines = [f"line {i}: {'é' * (i % 7)} words" for i in range(400)]
    text = "\n".join(lines) + "\n"
    (tmp_path / "play.txt").write_text(text)
    corpus = Corpus.from_spec(str(tmp_path / "play.txt"))
    tok = ByteTokenizer() if tokenizer == "bytes" else train_bpe_tokenizer([text], vocab_size=300)
    ds = build(corpus, tok, tmp_path / "s", val_fraction=0.1)
    (train,), (val,) = documents_of(ds, "train", tok), documents_of(ds, "val", tok)
    assert train + val == text and train.endswith("\n") and val.startswith("line ")
    assert 0.08 * len(text.encode()) < len(val.encode()) <= 0.1 * len(text.encode())
    assert ds.index["splits"]["val"]["documents"] == 1
    assert ds.index["splits"]["train"]["bytes"] + ds.index["splits"]["val"]["bytes"] == len(text.encode())
    assert build(corpus, tok, tmp_path / "s", val_fraction=0.1).reused
    assert documents_of(build(corpus, tok, tmp_path / "t", val_fraction=0), "train", tok) == [text]


def test_a_single_text_holds_out_about_its_fraction_whatever_its_lines():
    """The cut moves to the nearest line start only when one is near: a short last line, or no newline
    near the cut, still leaves about val_fraction of the text for validation."""
    from mixcon.data.shards import _held_out_end

    for text in ["x" * 9990 + "\n" + "y" * 9, "a" * 10_000, "para\n" * 1999 + "THE END", "l\r\n" * 4000]:
        train, val = _held_out_end(text, 0.01)
        assert train + val == text and 0.005 * len(text) <= len(val) <= 0.015 * len(text), (len(val), text[-20:])
    train, val = _held_out_end("para\n" * 2000, 0.01)
    assert val.startswith("para") and train.endswith("\n")  # at a line start where one is near
    text = "a" * 69 + "\n" + "b" * 30  # the cut at 80; the line start at 70, half the held-out 20 before it
    assert _held_out_end(text, 0.2) == (text[:70], text[70:])
    assert _held_out_end("a" * 68 + "\n" + "b" * 31, 0.2)[1] == "b" * 20  # one further: the cut point itself
    text = "a" * 77 + "\n" + "b" * 6 + "\n" + "c" * 15  # the cut at 80: line starts at 78 and 85, the nearer
    assert _held_out_end(text, 0.2) == (text[:78], text[78:])


def test_a_cut_point_at_a_line_start_stays_where_it_is():
    """Lines of two characters, the cut at 90 itself a line start: the held-out end is exactly the last 10 %,
    not moved to a line start two characters away on either side."""
    from mixcon.data.shards import _held_out_end

    text = "a\n" * 50
    assert _held_out_end(text, 0.1) == (text[:90], text[90:])
    text = "ab\n" * 40  # the cut at 108, a line start; others at 105 and 111, within the slack of 6
    assert _held_out_end(text, 0.1) == (text[:108], text[108:])


def test_validation_documents_fill_the_budget_when_sizes_allow():
    """Documents of 25, 25 and 50 bytes with val_fraction 0.5: whatever the seeded order, validation holds
    exactly 50 bytes (a text that fits the remaining budget exactly is taken)."""
    from mixcon.data.shards import _val_documents

    sizes = [25, 25, 50]
    for seed in range(8):
        val = _val_documents([b"a", b"b", b"c"], sizes, 0.5, seed)
        assert sum(sizes[i] for i in val) == 50, (seed, val)


def test_a_single_text_holds_out_its_fraction_of_the_bytes_not_of_the_characters():
    """An end in another script (3 UTF-8 bytes per character here): the held-out share counts bytes."""
    from mixcon.data.shards import _held_out_end

    text = "plain ascii line\n" * 900 + "日本語の行です\n" * 300  # 15,300 + 6,600 bytes
    train, val = _held_out_end(text, 0.1)
    assert train + val == text and val.startswith("日本") and train.endswith("\n")
    assert 0.09 < len(val.encode()) / len(text.encode()) <= 0.11
    with pytest.raises(ValueError, match=r"of the single text's 9 bytes, it leaves none for training; use one in "
                                         r"\[0.333, 0.666667\]"):  # whole characters of 3 bytes
        _held_out_end("日本語", 0.8)
    assert _held_out_end("日本語", 0.6) == ("日", "本語")


@pytest.mark.parametrize("one_text", [False, True])
def test_training_documents_are_the_training_splits(tmp_path, random_documents, write_documents, one_text):
    """What a run's tokenizer may learn from: the training split's documents (a single text's part before its
    held-out end), never a validation one."""
    if one_text:
        (tmp_path / "c.txt").write_text("".join(f"line {i}: é words\n" for i in range(500)))
        spec = str(tmp_path / "c.txt")
    else:
        spec = str(write_documents(tmp_path / "c", random_documents(40)))
    ds = build(Corpus.from_spec(spec), ByteTokenizer(), tmp_path / "s", val_fraction=0.2, seed=5, max_bytes=9_000)
    seen = list(training_documents(Corpus.from_spec(spec), 0.2, seed=5, max_bytes=9_000))
    val = documents_of(ds, "val", ByteTokenizer())
    assert seen == documents_of(ds, "train", ByteTokenizer()) and val and not set(val) & set(seen)
    with pytest.raises(ValueError, match=r"val_fraction=1: must be in \[0, 1\)"):
        next(training_documents(Corpus.from_spec(spec), 1))


def test_the_summary_says_cut_exactly_when_max_bytes_left_text_out(tmp_path):
    """Cut inside a character (fewer bytes kept than max_bytes) is still a cut; a corpus exactly max_bytes long,
    or one whose last document ends there with nothing after it, is not."""
    (tmp_path / "a.txt").write_text("é" * 1500)  # 3,000 bytes
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "1.txt").write_text("x" * 120)
    (tmp_path / "b" / "2.txt").write_text("")  # empty: not text left out
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "1.txt").write_text("x" * 120)
    (tmp_path / "c" / "2.txt").write_text("more")
    for spec, max_bytes, cut in [("a.txt", 999, True), ("b", 120, False), ("c", 120, True), ("c", 124, False)]:
        ds = build(Corpus.from_spec(str(tmp_path / spec)), ByteTokenizer(), tmp_path / f"s-{spec}-{max_bytes}",
                   val_fraction=0, max_bytes=max_bytes)
        assert ("cut at its first" in ds.summary()) == cut, (spec, max_bytes)


def test_shards_are_mapped_read_only(tmp_path):
    """A write into the token stream a loader cuts windows from raises, rather than changing the shard files on disk
    (and a shard folder that is read-only for the user still opens)."""
    (tmp_path / "a.txt").write_text("some text to tokenise\n" * 20)
    ds = build(Corpus.from_spec(str(tmp_path / "a.txt")), ByteTokenizer(), tmp_path / "s", val_fraction=0.1)
    for split in ("train", "val"):
        stream = ds.tokens(split)
        assert len(stream) > 0 and not stream.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            stream[0] = 0
    assert ShardDataset(tmp_path / "s").train.tolist() == [*b"some text to tokenise\n" * 18, ByteTokenizer().eos_id]


def test_a_missing_shard_file_is_named_and_rebuilt(tmp_path, capsys, random_documents, write_documents):
    corpus = Corpus.from_spec(str(write_documents(tmp_path / "c", random_documents(10))))
    out = tmp_path / "s"
    ds = build(corpus, ByteTokenizer(), out)
    (out / ds.index["splits"]["val"]["file"]).unlink()
    with pytest.raises(ShardError, match=r"val\.[0-9a-f]{16}\.bin: missing \(val shard named in index\.json\); "
                                         r"rebuild the shards"):
        ShardDataset(out)
    rebuilt = build(corpus, ByteTokenizer(), out)
    assert not rebuilt.reused and rebuilt.index["splits"] == ds.index["splits"]
    assert "rebuilding shards: " in capsys.readouterr().out


def test_a_build_that_waited_reuses_the_shards_the_other_process_built(tmp_path, monkeypatch, random_documents,
                                                                       write_documents):
    """Shards not there yet when a build starts, and finished by the build it waits for: reused, not rebuilt."""
    import shutil
    import threading

    from mixcon.io import locked_directory

    corpus = Corpus.from_spec(str(write_documents(tmp_path / "c", random_documents(10))))
    ready = build(corpus, ByteTokenizer(), tmp_path / "ready")  # what the other process will have built
    out = tmp_path / "s"
    out.mkdir()
    real_reused, looked, found = shards_module._reused, threading.Event(), []

    def reused(folder, key):
        found.append(real_reused(folder, key))
        looked.set()
        return found[-1]

    monkeypatch.setattr(shards_module, "_reused", reused)
    holding = threading.Event()

    def other_build() -> None:  # holds the lock, and finishes its shards after this build has looked for them
        with locked_directory(out, lambda pid: None):
            holding.set()
            looked.wait(30)
            for path in (tmp_path / "ready").iterdir():
                if path.name == "index.json" or path.suffix == ".bin":  # (not the lock file)
                    shutil.copy(path, out / path.name)

    thread = threading.Thread(target=other_build)
    thread.start()
    holding.wait(30)
    ds = build(corpus, ByteTokenizer(), out)
    thread.join()
    assert ds.reused and ds.index == ready.index
    assert [f is None for f in found] == [True, False]  # none before the lock, the other's after it


def test_a_leftover_of_another_users_running_build_is_kept(tmp_path, monkeypatch, random_documents,
                                                           write_documents):
    """Whether a process of another user runs, signal 0 answers with PermissionError: it runs, its file stays."""
    folder = write_documents(tmp_path / "c", random_documents(10))
    out = tmp_path / "s"
    build(Corpus.from_spec(str(folder)), ByteTokenizer(), out)
    theirs = out / "train.0123456789abcdef.bin.999999.tmp"
    theirs.write_bytes(b"partial")
    kill = os.kill

    def not_permitted(pid: int, signum: int) -> None:
        if pid == 999999:
            raise PermissionError(1, "Operation not permitted")
        kill(pid, signum)

    monkeypatch.setattr(shards_module.os, "kill", not_permitted)
    assert build(Corpus.from_spec(str(folder)), ByteTokenizer(), out).reused
    assert theirs.read_bytes() == b"partial"
