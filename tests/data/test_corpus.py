"""Corpora: text files, folders and globs, JSON Lines, `datasets`, the stdlib default; skips and errors."""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import types
from pathlib import Path

import pytest

from mixcon.data import Corpus, default_corpus, train_bpe_tokenizer


def test_text_file_is_one_document_kept_exactly(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("line one\r\n  indented é\n\n".encode())
    corpus = Corpus.from_spec(str(path))
    assert list(corpus) == ["line one\r\n  indented é\n\n"]
    assert str(path) in corpus.describe()
    path.write_bytes(b"\xef\xbb\xbfwith a BOM\n")  # a byte-order mark is not text, as in JSON Lines
    assert list(Corpus.from_spec(str(path))) == ["with a BOM\n"]


def test_folder_is_recursive_txt_and_globs_pick_other_files(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "sub" / "deeper" / "a.txt").write_text("A")
    (tmp_path / "sub" / "c.md").write_text("C")
    assert list(Corpus.from_spec(str(tmp_path))) == ["B", "A"]  # sorted paths: b.txt < sub/deeper/a.txt
    assert list(Corpus.from_spec(f"{tmp_path}/**/*.md")) == ["C"]
    assert list(Corpus.from_spec(f"{tmp_path}/**/*")) == ["B", "C", "A"]
    assert list(Corpus.from_spec(f"{tmp_path}/**")) == ["B", "C", "A"]  # '**' alone: every file below
    assert "3 files" in Corpus.from_spec(f"{tmp_path}/**/*").describe()
    (tmp_path / "z.txt").write_text("Z")
    assert list(Corpus.from_spec(str(tmp_path))) == ["B", "A", "Z"]  # by path, not folder by folder: sub/ < z.txt
    (tmp_path / "z.txt").unlink()
    (tmp_path / "data[1].txt").write_text("D")  # glob characters in the name of a file that exists
    assert list(Corpus.from_spec(str(tmp_path / "data[1].txt"))) == ["D"]


def test_globs_leave_hidden_files_and_the_folder_being_written_out(tmp_path):
    """As a shell's glob: hidden files and folders only where the glob names them (it read a run's .lock file);
    `exclude` leaves out what a run writes inside the corpus (a second run read the first's shards and metrics as
    text), and a corpus with nothing else is refused."""
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    (tmp_path / ".lock").write_text("123")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "run" / "data").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("{}")
    (tmp_path / "run" / "data" / "shard.txt").write_text("S")
    assert list(Corpus.from_spec(f"{tmp_path}/**")) == ["A", "S", "{}"]  # sorted: run/data/... < run/metrics...
    assert list(Corpus.from_spec(f"{tmp_path}/.*")) == ["123"]  # named: read
    assert list(Corpus.from_spec(f"{tmp_path}/.git/*")) == ["ref"]
    written = [tmp_path / "run" / "data", tmp_path / "run" / "metrics.jsonl"]
    assert list(Corpus.from_spec(f"{tmp_path}/**", exclude=written)) == ["A"]
    assert list(Corpus.from_spec(str(tmp_path), exclude=written)) == ["A"]  # a folder's *.txt too
    assert list(Corpus.from_spec(f"{tmp_path}/**", exclude=[tmp_path / "run" / "data"])) == ["A", "{}"]
    with pytest.raises(FileNotFoundError, match=r"every file it names is one this command writes"):
        Corpus.from_spec(f"{tmp_path}/run/**", exclude=written)
    (tmp_path / "b.txt").symlink_to(tmp_path / "a.txt")  # a second name of a file: one document, as in a folder
    assert list(Corpus.from_spec(f"{tmp_path}/*.txt")) == ["A"] == list(Corpus.from_spec(str(tmp_path), written))


def test_a_folder_is_read_through_links_each_file_once(tmp_path):
    """A linked folder (data kept elsewhere) is read, a link loop ends, a second link to a file is not a second
    document, and a broken link is skipped by name."""
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "shared"
    (corpus / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (corpus / "a.txt").write_text("own text")
    (elsewhere / "e.txt").write_text("shared text")
    (corpus / "linked").symlink_to(elsewhere)
    (corpus / "again.txt").symlink_to(corpus / "a.txt")
    (corpus / "broken.txt").symlink_to(tmp_path / "gone.txt")
    (corpus / "sub" / "loop").symlink_to(corpus)
    (corpus / "sub" / "up").symlink_to(tmp_path)  # above the corpus: the folders beside it are not the corpus
    (tmp_path / "beside").mkdir()
    (tmp_path / "beside" / "b.txt").write_text("not the corpus")
    c = Corpus.from_spec(str(corpus))
    assert sorted(c.documents()) == ["own text", "shared text"]
    assert c.skipped == [f"{corpus / 'broken.txt'}: unreadable (No such file or directory)"]


def test_json_lines_after_a_byte_order_mark(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    assert list(Corpus.from_spec(f"{tmp_path}/bom.jsonl")) == ["first", "second"]


def test_unreadable_and_non_utf8_files_are_skipped_and_counted(tmp_path, monkeypatch):
    for name, data in [("1.txt", b"good one"), ("2.txt", b"\xff\xfe latin-1 \xe9"), ("3.txt", b"locked"),
                       ("4.txt", b"good two")]:
        (tmp_path / name).write_bytes(data)
    read_bytes = Path.read_bytes

    def deny(self):  # root can read any file, so refuse one by hand
        if self.name == "3.txt":
            raise PermissionError(13, "Permission denied")
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    corpus = Corpus.from_spec(str(tmp_path))
    assert list(corpus) == ["good one", "good two"]
    assert [s.rsplit("/", 1)[-1] for s in corpus.skipped] == ["2.txt: not UTF-8",
                                                              "3.txt: unreadable (Permission denied)"]
    assert "skipped 2" in corpus.describe()
    assert list(corpus) == ["good one", "good two"] and len(corpus.skipped) == 2  # counts restart each pass


def test_json_lines_with_a_named_field(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "first", "id": 1}).encode(), b"", b"{broken", b'{"text": "caf\xe9"}',
             json.dumps({"text": "東京 😀\nline", "id": 2}).encode(), b'{"text": "bad \\ud800 x"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    corpus = Corpus.from_spec(str(path))
    assert list(corpus) == ["first", "東京 😀\nline"]
    assert [s.rsplit("/", 1)[-1] for s in corpus.skipped] == ["d.jsonl:3: not JSON", "d.jsonl:4: not UTF-8",
                                                              "d.jsonl:6: not UTF-8 (a lone surrogate)"]
    other = tmp_path / "e.jsonl"
    other.write_text(json.dumps({"content": "x"}) + "\n")
    assert list(Corpus.from_spec(f"{other}:content")) == ["x"]
    assert list(Corpus.from_spec(f"{tmp_path}/e*.jsonl:content")) == ["x"]  # a glob of JSON Lines files
    with pytest.raises(ValueError, match=r"e.jsonl:1: no field 'text' \(found: content\)"):
        list(Corpus.from_spec(str(other)))
    other.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(ValueError, match=r"e.jsonl:1: field 'text' is int, expected a string"):
        list(Corpus.from_spec(str(other)))


def test_max_bytes_caps_the_text_at_a_character_boundary(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "1.txt").write_text("abc")
    (folder / "2.txt").write_text("éééé")  # 8 bytes
    (folder / "3.txt").write_text("never read")
    corpus = Corpus.from_spec(str(folder))
    assert list(corpus.documents(max_bytes=3)) == ["abc"]
    assert list(corpus.documents(max_bytes=8)) == ["abc", "éé"]  # 5 bytes left: two whole characters
    assert list(corpus.documents(max_bytes=11)) == ["abc", "éééé"]
    with pytest.raises(ValueError, match=r"max_bytes=0: must be a positive number"):
        list(corpus.documents(max_bytes=0))


def test_default_corpus_is_the_standard_library():
    corpus = Corpus.from_spec(None)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(corpus.paths) > 500 and all(p.suffix == ".py" and stdlib in p.parents for p in corpus.paths)
    assert not any("site-packages" in p.parts for p in corpus.paths)
    assert corpus.paths == default_corpus().paths == Corpus.from_spec("stdlib").paths
    docs = list(corpus.documents(max_bytes=300_000))
    assert 300_000 - 3 <= sum(len(d.encode()) for d in docs) <= 300_000
    assert any("def " in d for d in docs)


def test_the_default_corpus_order_does_not_depend_on_the_file_system():
    """Folders and files in name order, each folder's files before its subfolders' (the order a directory listing
    returns varies between machines; the first max_bytes of the corpus, and so the shards' key, must not)."""
    paths = default_corpus().paths
    root = Path(sysconfig.get_paths()["stdlib"])
    assert paths == sorted(paths, key=lambda p: (p.parent.relative_to(root).parts, p.name))


def test_a_file_named_like_json_lines_with_a_field_is_that_file(tmp_path):
    """'notes.jsonl:v2' names an existing file: it is read whole, not as field 'v2' of notes.jsonl."""
    (tmp_path / "notes.jsonl").write_text('{"v2": "the field"}\n')
    (tmp_path / "notes.jsonl:v2").write_text("the file itself\n")
    assert list(Corpus.from_spec(str(tmp_path / "notes.jsonl:v2"))) == ["the file itself\n"]
    (tmp_path / "notes.jsonl:v2").unlink()
    assert list(Corpus.from_spec(str(tmp_path / "notes.jsonl:v2"))) == ["the field"]  # no such file: FILE.jsonl:FIELD


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    corpus = Corpus.from_spec(str(tmp_path))
    empty = r"empty corpus: no documents in text .* \(2 files\); skipped 1 \(.*latin1.txt: not UTF-8\)"
    with pytest.raises(ValueError, match=empty):  # named, with what was skipped, by every reader
        list(corpus)
    with pytest.raises(ValueError, match=empty):
        train_bpe_tokenizer(corpus, vocab_size=300)
    (tmp_path / "accent.txt").write_text("é and more")
    with pytest.raises(ValueError, match=r"empty corpus: no documents in text .*accent.txt"):
        list(Corpus.from_spec(str(tmp_path / "accent.txt")).documents(max_bytes=1))  # half a character: nothing
    assert list(Corpus.from_spec(str(tmp_path / "accent.txt")).documents(max_bytes=2)) == ["é"]


def test_spec_errors_name_the_spec_and_the_forms(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"corpus '.*nope': no such file or folder\ncorpus specs:"):
        Corpus.from_spec(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"no files match the glob"):
        Corpus.from_spec(f"{tmp_path}/**/*.md")
    with pytest.raises(FileNotFoundError, match=r"no \*.txt files in the folder; name other files with a glob"):
        Corpus.from_spec(str(tmp_path))


class FakeDataset(list):
    column_names = ("text", "id")


def test_huggingface_datasets_from_disk_and_cache(tmp_path, monkeypatch):
    rows = FakeDataset([{"text": "one", "id": 1}, {"text": "two", "id": 2}])
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: calls.append(("disk", path)) or {"train": rows, "test": rows[:1]}
    fake.load_dataset = lambda name, split: calls.append(("cache", name, split)) or rows
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert list(Corpus.from_spec(f"hf:{tmp_path}")) == ["one", "two"]
    assert list(Corpus.from_spec("hf:someone/corpus:text")) == ["one", "two"]
    assert calls == [("disk", str(tmp_path)), ("cache", "someone/corpus", "train")]
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: text, id\); name one as hf:x:COLUMN"):
        Corpus.from_spec("hf:x:body")
    fake.load_from_disk = lambda path: {"test": rows}
    with pytest.raises(ValueError, match=r"no 'train' split \(splits: test\)"):
        Corpus.from_spec(f"hf:{tmp_path}")


def test_huggingface_corpus_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"needs the `datasets` library \(pip install datasets\)"):
        Corpus.from_spec("hf:wikitext")


def test_links_back_into_the_corpus_are_walked_once(tmp_path):
    """Two links to the folder they lie in: each folder is walked once (the walk went down every path of links,
    exponentially many)."""
    sub = tmp_path / "corpus" / "sub"
    sub.mkdir(parents=True)
    (sub / "x.txt").write_text("the one document")
    for name in ("l1", "l2"):
        (sub / name).symlink_to(sub)
    corpus = Corpus.from_spec(str(tmp_path / "corpus"))
    assert corpus.paths == [sub / "x.txt"] and list(corpus) == ["the one document"]


def test_a_pipe_named_like_text_is_no_document(tmp_path):
    """Reading a FIFO would wait forever for a writer."""
    (tmp_path / "a.txt").write_text("text")
    os.mkfifo(tmp_path / "pipe.txt")
    assert Corpus.from_spec(str(tmp_path)).paths == [tmp_path / "a.txt"]


@pytest.mark.parametrize("line", ['"some text here"', "[1, 2]", "3"])
def test_a_json_line_that_is_no_object_is_named(tmp_path, line):
    (tmp_path / "d.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: no field 'text' \(found: (str|list|int)\)"):
        list(Corpus.from_spec(str(tmp_path / "d.jsonl")))


def test_an_unreadable_json_lines_file_is_skipped_and_counted(tmp_path, monkeypatch):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text(json.dumps({"text": f"from {name}"}) + "\n")
    open_file = Path.open

    def deny(self, *args, **kwargs):  # root can read any file, so refuse one by hand
        if self.name == "a.jsonl":
            raise PermissionError(13, "Permission denied")
        return open_file(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    corpus = Corpus.from_spec(f"{tmp_path}/*.jsonl")
    assert list(corpus) == ["from b.jsonl"]
    assert [s.rsplit("/", 1)[-1] for s in corpus.skipped] == ["a.jsonl: unreadable (Permission denied)"]


def test_a_python_without_standard_library_sources_has_no_default_corpus(tmp_path, monkeypatch):
    """An embedded or frozen Python may ship its standard library compiled only: the error names where it looked."""
    (tmp_path / "os.pyc").write_bytes(b"")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=rf"no Python standard library sources under {tmp_path} "
                                                r"\(from sysconfig\)"):
        default_corpus()
