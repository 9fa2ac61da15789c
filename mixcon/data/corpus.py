"""Corpora: document strings from text files, globs, JSON Lines or a local `datasets` dataset.

The default corpus is Python's own standard library source (found through `sysconfig`): tens of MB of
real text on every machine, with no download.
"""

from __future__ import annotations

import json
import os
import stat
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SPEC_FORMS = """corpus specs:
  stdlib (or none)       Python's standard library sources, one document per .py file (the default)
  FILE                   one text file, one document
  DIR                    every *.txt file under DIR, recursively, one document per file
  GLOB                   the files matching GLOB ("**" recurses), e.g. 'src/**/*.py', each once; hidden
                         files and folders (names starting with ".") only where GLOB names them
  PATH.jsonl[:FIELD]     JSON Lines (a file or a glob ending in .jsonl), one document per line from FIELD
                         (default "text")
  hf:NAME_OR_DIR[:FIELD] a Hugging Face `datasets` dataset saved locally (save_to_disk) or in the local
                         cache, split "train", column FIELD (default "text")"""

GLOB_CHARS = "*?["


class Corpus(ABC):
    """Re-iterable document strings in a fixed order; files that cannot be read as UTF-8 are skipped."""

    def __init__(self, description: str):
        self.description = description
        self.skipped: list[str] = []  # "where: why" for each file or record the latest pass skipped
        self.truncated = False  # whether the latest pass's max_bytes left text out

    @abstractmethod
    def _documents(self) -> Iterator[str]:
        """Every document, empty ones included, recording skips with `_skip`."""

    def __iter__(self) -> Iterator[str]:
        return self.documents()

    def documents(self, max_bytes: int | None = None) -> Iterator[str]:
        """The non-empty documents; with `max_bytes`, only the first `max_bytes` UTF-8 bytes of them (the last
        document is cut at a character boundary). A corpus without any is a ValueError naming what it skipped."""
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes}: must be a positive number of bytes, or None for all")
        self.skipped, self.truncated = [], False
        budget = max_bytes
        empty = True
        docs = self._documents()
        for doc in docs:
            if not doc:
                continue
            last = False
            if budget is not None:
                data = doc.encode("utf-8")
                last = len(data) >= budget
                if last:
                    doc = data[:budget].decode("utf-8", errors="ignore")
                    self.truncated = len(data) > budget or any(docs)  # (any: a later non-empty document)
                else:
                    budget -= len(data)
            if doc:
                empty = False
                yield doc
            if last:
                break
        if empty:
            cut = (f" within its first max_bytes={max_bytes} bytes (they end inside the first character; allow more)"
                   if self.truncated else "")
            raise ValueError(f"empty corpus: no documents in {self.describe()}{cut}")

    def describe(self) -> str:
        """What the corpus is, and how many files or records the latest pass skipped (with the first few)."""
        if not self.skipped:
            return self.description
        shown = "; ".join(self.skipped[:3]) + ("; ..." if len(self.skipped) > 3 else "")
        return f"{self.description}; skipped {len(self.skipped)} ({shown})"

    def _skip(self, where: object, why: str) -> None:
        self.skipped.append(f"{where}: {why}")

    @staticmethod
    def from_spec(spec: str | None, exclude: Iterable[str | os.PathLike | None] = ()) -> Corpus:
        """A corpus from a spec string (see SPEC_FORMS); None, '' or 'stdlib' is the default corpus. `exclude`: files
        and folders left out (what a command writes, where the corpus holds it; None: an output not asked for)."""
        if spec in (None, "", "stdlib"):
            return default_corpus()
        if spec.startswith("hf:"):
            return _hf_corpus(spec[3:])
        head, sep, field = spec.rpartition(":")
        if sep and head.endswith(".jsonl") and not Path(spec).exists():
            spec = head
        else:
            field = "text"
        paths = _match(spec)
        written = {Path(p).resolve() for p in exclude if p is not None}
        if written:
            paths = [p for p in paths if not written.intersection((real := p.resolve(), *real.parents))]
            if not paths:
                raise FileNotFoundError(f"corpus {spec!r}: every file it names is one this command writes")
        files = f"{len(paths)} file{'s' if len(paths) > 1 else ''}"
        if spec.endswith(".jsonl"):
            return JsonLines(paths, field, f"JSON Lines {spec} ({files}, field {field!r})")
        return TextFiles(paths, f"text {spec} ({files})")


class TextFiles(Corpus):
    """One document per UTF-8 text file (without a leading byte-order mark)."""

    def __init__(self, paths: list[Path], description: str):
        super().__init__(description)
        self.paths = paths

    def _documents(self) -> Iterator[str]:
        for path in self.paths:
            try:
                yield path.read_bytes().decode("utf-8-sig")  # a byte-order mark is not text (as in JSON Lines)
            except UnicodeDecodeError:
                self._skip(path, "not UTF-8")
            except OSError as e:
                self._skip(path, f"unreadable ({e.strerror or e})")


class JsonLines(Corpus):
    """One document per line of JSON Lines files: the string in `field` of each object."""

    def __init__(self, paths: list[Path], field: str, description: str):
        super().__init__(description)
        self.paths, self.field = paths, field

    def _documents(self) -> Iterator[str]:
        for path in self.paths:
            try:
                f = path.open("rb")
            except OSError as e:
                self._skip(path, f"unreadable ({e.strerror or e})")
                continue
            with f:
                for number, line in enumerate(f, 1):
                    doc = self._record(f"{path}:{number}", line) if line.strip() else None
                    if doc is not None:
                        yield doc

    def _record(self, where: str, line: bytes) -> str | None:
        """The text of one line, or None (and a skip) for a line that is not UTF-8 JSON."""
        try:
            record = json.loads(line.decode("utf-8-sig"))  # a byte-order mark may start the file
        except UnicodeDecodeError:
            self._skip(where, "not UTF-8")
            return None
        except json.JSONDecodeError:
            self._skip(where, "not JSON")
            return None
        if not isinstance(record, dict) or self.field not in record:
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: no field {self.field!r} (found: {fields}); "
                             f"name the text field as FILE.jsonl:FIELD")
        text = _text(where, self.field, record[self.field])
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape (\ud800): JSON allows it, UTF-8 text does not
            self._skip(where, "not UTF-8 (a lone surrogate)")
            return None
        return text


class HFDataset(Corpus):
    """One document per row of a Hugging Face `datasets` dataset: the string in column `field`."""

    def __init__(self, dataset: Any, field: str, description: str):
        super().__init__(description)
        self.dataset, self.field = dataset, field

    def _documents(self) -> Iterator[str]:
        for i, row in enumerate(self.dataset):
            yield _text(f"row {i}", self.field, row[self.field])


def default_corpus() -> TextFiles:
    """Python's standard library source files (no site-packages), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [Path(directory) / name for name in sorted(files) if name.endswith(".py")]
    if not paths:
        raise FileNotFoundError(f"no Python standard library sources under {root} (from sysconfig)")
    return TextFiles(paths, f"Python standard library {root} ({len(paths)} .py files)")


def _text(where: str, field: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def _match(spec: str) -> list[Path]:
    """The files a FILE, DIR or GLOB spec names, sorted."""
    path = Path(spec)
    if any(c in spec for c in GLOB_CHARS) and not path.exists():  # a file named 'data[1].txt' is a file
        if path.name == "**":  # every file below, as '**' alone would name only folders
            path = path / "*"
        parts = path.parts
        first = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
        root = Path(*parts[:first]) if first else Path(".")
        pattern = Path(*parts[first:])
        hidden_named = any(part.startswith(".") for part in pattern.parts)
        matched = sorted(p for p in root.glob(str(pattern)) if p.is_file() and (
            hidden_named or not any(part.startswith(".") for part in p.relative_to(root).parts)))
        if not matched:
            raise FileNotFoundError(f"corpus {spec!r}: no files match the glob")
        files: dict[tuple[int, int], Path] = {}
        for p in matched:  # each file once: a link to a file already matched is left out, as in a folder
            st = p.stat()
            files.setdefault((st.st_dev, st.st_ino), p)
        return list(files.values())
    if path.is_dir():
        paths = _text_files(path)
        if not paths:
            raise FileNotFoundError(f"corpus {spec!r}: no *.txt files in the folder; "
                                    f"name other files with a glob such as '{path}/**/*.md'")
        return paths
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"corpus {spec!r}: no such file or folder\n{SPEC_FORMS}")


def _text_files(folder: Path) -> list[Path]:
    """Every *.txt below `folder`, sorted: through linked folders (each folder once, not up to `folder` or above
    it), each file once (a link to a file already listed is left out), a broken link kept (reading it skips it by
    name)."""
    top = folder.resolve()
    folders: set[tuple[int, int]] = set()
    files: dict[tuple[int, int] | Path, Path] = {}
    for root, dirs, names in os.walk(folder, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in folders:
            dirs.clear()
            continue
        folders.add((st.st_dev, st.st_ino))
        # A fixed walk (which of two links to one file is kept does not depend on the file system), never up
        # through a link to the folder or one above it (which would read the folders beside the corpus).
        dirs[:] = sorted(d for d in dirs if not (top == (real := Path(root, d).resolve()) or real in top.parents))
        for name in sorted(n for n in names if n.endswith(".txt")):
            path = Path(root, name)
            try:
                st = path.stat()
            except OSError:  # a broken link
                files[path] = path
                continue
            if stat.S_ISREG(st.st_mode):  # (not a pipe or a device)
                files.setdefault((st.st_dev, st.st_ino), path)
    return sorted(files.values())


def _hf_corpus(spec: str) -> HFDataset:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"corpus 'hf:{spec}' needs the `datasets` library (pip install datasets)") from e
    name, _, field = spec.partition(":")
    field = field or "text"
    data = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name, split="train")
    if isinstance(data, dict):  # a DatasetDict
        if "train" not in data:
            raise ValueError(f"corpus 'hf:{spec}': no 'train' split (splits: {', '.join(data)})")
        data = data["train"]
    if field not in data.column_names:
        raise ValueError(f"corpus 'hf:{spec}': no column {field!r} (columns: {', '.join(data.column_names)}); "
                         f"name one as hf:{name}:COLUMN")
    return HFDataset(data, field, f"Hugging Face dataset {name} ({len(data)} rows, column {field!r})")
