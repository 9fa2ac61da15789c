"""`mixcon tokenizer train`: a BPE trained on a corpus, its summary, overwriting, errors."""

from __future__ import annotations

import pytest

from mixcon.cli import main
from mixcon.data import load_tokenizer


def test_tokenizer_train_keeps_an_existing_tokenizer_unless_told(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("the cat sat on the mat\n" * 50)
    argv = ["tokenizer", "train", "--corpus", str(tmp_path / "c.txt"), "--vocab-size", "270", "--out",
            str(tmp_path / "tok")]
    assert main(argv) == 0
    before = (tmp_path / "tok" / "tokenizer.json").read_text()
    (tmp_path / "c.txt").write_text("other words entirely, quite different\n" * 50)
    with pytest.raises(SystemExit, match=r"tokenizer.json exists .*--overwrite"):
        main(argv)
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == before
    assert main([*argv, "--overwrite"]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").read_text() != before
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json"]  # no temporary file left


def test_tokenizer_train_on_a_glob_corpus_leaves_out_the_tokenizer_it_writes_there(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("the cat sat on the mat\n" * 50)
    argv = ["tokenizer", "train", "--corpus", f"{tmp_path}/**", "--vocab-size", "270", "--out", str(tmp_path / "tok"),
            "--overwrite"]
    assert main(argv) == 0
    first = (tmp_path / "tok" / "tokenizer.json").read_text()
    assert main(argv) == 0  # the same corpus, not the first tokenizer.json beside it
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == first
    assert "1 file" in capsys.readouterr().out


def test_tokenizer_train_reads_only_max_bytes(tmp_path, capsys):
    """--max-bytes bounds what the BPE learns from and what the summary counts; --vocab-size defaults to 8192."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("the cat sat on the mat. " * 200)
    (folder / "b.txt").write_text("zebra quokka " * 400)
    base = ["tokenizer", "train", "--corpus", str(folder)]
    assert main([*base, "--max-bytes", "4000", "--out", str(tmp_path / "cut")]) == 0
    out = capsys.readouterr().out
    assert "bytes        4,000\n" in out and "(asked for 8,192)" in out
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    assert "bytes        10,000\n" in capsys.readouterr().out
    cut, whole = load_tokenizer(tmp_path / "cut"), load_tokenizer(tmp_path / "whole")
    assert len(cut.encode("zebra quokka")) > len(whole.encode("zebra quokka")) == 2  # not merged from what it read


def test_tokenizer_train_summary_counts_utf8_bytes_tokens_and_the_trained_vocabulary(tmp_path, capsys):
    """bytes: UTF-8 bytes, not characters; tokens: what the saved tokenizer encodes; vocabulary: the trained size
    (--vocab-size reaches the trainer; a small corpus gives fewer than asked)."""
    text = "naïve 東京 café, the year 2024. " * 30
    (tmp_path / "c.txt").write_text(text)
    base = ["tokenizer", "train", "--corpus", str(tmp_path / "c.txt")]
    assert main([*base, "--vocab-size", "270", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "a")
    n_bytes, n_tokens = len(text.encode("utf-8")), len(tok.encode(text))
    assert tok.vocab_size == 270 and "vocabulary   270 (asked for 270)" in out
    assert f"bytes        {n_bytes:,}\n" in out and f"tokens       {n_tokens:,}\n" in out
    assert f"bytes/token  {n_bytes / n_tokens:.3f} (" in out
    assert main([*base, "--out", str(tmp_path / "b")]) == 0  # 8192 asked: this corpus has far fewer merges
    trained = load_tokenizer(tmp_path / "b").vocab_size
    assert trained < 8192 and f"vocabulary   {trained:,} (asked for 8,192)" in capsys.readouterr().out


def test_tokenizer_train_reads_the_whole_corpus_without_max_bytes(tmp_path, monkeypatch):
    from mixcon.cli import tokenizer

    asked, documents = [], tokenizer.Corpus.documents
    monkeypatch.setattr(tokenizer.Corpus, "documents",
                        lambda self, max_bytes=None: asked.append(max_bytes) or documents(self, max_bytes))
    (tmp_path / "c.txt").write_text("the cat sat on the mat\n" * 50)
    argv = ["tokenizer", "train", "--corpus", str(tmp_path / "c.txt"), "--vocab-size", "270", "--overwrite"]
    assert main([*argv, "--out", str(tmp_path / "tok")]) == 0
    assert main([*argv, "--max-bytes", "0", "--out", str(tmp_path / "tok")]) == 0
    assert asked == [None] * 4  # training and the summary: every byte, without --max-bytes and with 0


def test_tokenizer_train_needs_out_and_names_itself_in_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer", "train", "--corpus", "x"])
    assert exit_info.value.code == 2 and "the following arguments are required: --out" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^mixcon tokenizer train: corpus '/no/such/corpus'"):
        main(["tokenizer", "train", "--corpus", "/no/such/corpus", "--out", str(tmp_path / "t")])


def test_tokenizer_train_writes_into_its_corpus_folder(tmp_path, capsys):
    """--out may be the folder of text it reads: only tokenizer.json is written there, and only it is left out of
    the corpus the next time (it was the whole folder: "every file it names is one this command writes")."""
    (tmp_path / "c.txt").write_text("the cat sat on the mat\n" * 50)
    argv = ["tokenizer", "train", "--corpus", str(tmp_path), "--vocab-size", "270", "--out", str(tmp_path)]
    assert main(argv) == 0 and main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "tokenizer.json"]
    assert "1 file" in capsys.readouterr().out


@pytest.mark.parametrize("size", ["258", str(2**24 + 1)])
def test_tokenizer_train_refuses_a_vocab_size_outside_its_range_before_reading(tmp_path, capsys, size):
    """--vocab-size in [259, 2**24] (256 bytes and 3 specials at least) is a usage error, before the corpus is read."""
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer", "train", "--corpus", "/no/such/corpus", "--vocab-size", size, "--out", str(tmp_path / "t")])
    assert exit_info.value.code == 2 and "argument --vocab-size" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
