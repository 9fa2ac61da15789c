"""Token shards: a corpus tokenised once into memory-mapped uint16/uint32 arrays plus a JSON index.

A folder holds `index.json` and one `.bin` file per split (`train`, `val`): the token ids of that split's
documents in corpus order, each document followed by EOS. Documents go to a split by a seeded hash of
their content, so the split is deterministic; a corpus of one document (a single text file) validates on
its last `val_fraction` (from a line start), as nanoGPT splits Shakespeare. Rebuilds happen only when the
key (tokenizer, corpus content, split settings) changes, and are atomic: new shards get new names and the
index that names them replaces the old one last, so an interrupted build leaves the previous index (or none) in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mixcon.data.corpus import Corpus
from mixcon.data.tokenizer import AnyTokenizer
from mixcon.io import locked_directory, write_text_atomic

FORMAT = 1
SPLIT_RULE = 4  # in the key: shards split by an earlier rule (a single text's end by characters; before: by
# document count; before: copies of a text on both sides) are rebuilt
INDEX = "index.json"
SPLITS = ("train", "val")
# A shard, or its temporary file while the process PID builds it: the only files a build removes.
SHARD_FILE = re.compile(r"(train|val)\.[0-9a-f]{16}\.bin(\.(?P<pid>\d+)\.tmp)?")
BATCH_BYTES = 1 << 20  # text per worker task

Batch = tuple[str, list[str], int]  # (split, documents, UTF-8 bytes)


class ShardError(ValueError):
    """Shards that are missing, incomplete or corrupt (a ValueError: bad data on disk)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ShardDataset:
    """The `train` and `val` token streams of a shard folder (read-only np.memmap) and its `index`."""

    def __init__(self, directory: str | os.PathLike, verify: bool = True):
        """Open and check the shards: sizes always, content checksums when `verify`."""
        self.directory = Path(directory)
        self.reused = False  # set by whoever opens shards built before (prepare_shards, a resumed run)
        path = self.directory / INDEX
        if not path.is_file():
            raise ShardError(f"{self.directory}: no {INDEX}, so no complete shards (never built, or the build was "
                             f"interrupted); build them with prepare_shards or `mixcon data prepare`")
        try:
            self.index: dict[str, Any] = json.loads(path.read_text())
            if self.index["format"] != FORMAT:
                raise ShardError(f"{path}: shard format {self.index['format']}, this mixcon reads {FORMAT}; rebuild")
            self.dtype = np.dtype(self.index["dtype"])
            self.train = self._open("train", verify)
            self.val = self._open("val", verify)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ShardError(f"{path}: corrupt index ({type(e).__name__}: {e}); rebuild the shards") from e

    def _open(self, split: str, verify: bool) -> np.ndarray:
        info = self.index["splits"][split]
        path = self.directory / info["file"]
        if not path.is_file():
            raise ShardError(f"{path}: missing ({split} shard named in {INDEX}); rebuild the shards")
        expected = info["tokens"] * self.dtype.itemsize
        size = path.stat().st_size
        if size != expected:
            raise ShardError(f"{path}: {size} bytes, expected {expected} ({info['tokens']} {self.dtype} tokens): "
                             f"truncated or corrupt; rebuild the shards")
        tokens = np.memmap(path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)
        if verify and _checksum(tokens) != info["checksum"]:
            raise ShardError(f"{path}: content does not match the checksum in {INDEX}: corrupt; rebuild the shards")
        return tokens

    def tokens(self, split: str) -> np.ndarray:
        """The token stream (N,) of 'train' or 'val'."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        return self.train if split == "train" else self.val

    @property
    def vocab_size(self) -> int:
        return self.index["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.index["tokenizer"]["eos_id"]

    def bytes_per_token(self, split: str = "train") -> float:
        """UTF-8 bytes of text per token (EOS included): converts nats per token to bits per byte."""
        info = self.index["splits"][split]
        return info["bytes"] / max(info["tokens"], 1)

    def summary(self) -> str:
        """Corpus, skipped files, tokenizer and per-split documents / bytes / tokens, one line each."""
        ix, tok = self.index, self.index["tokenizer"]
        cut = f", cut at its first {ix['max_bytes']:,} bytes (--max-bytes)" if ix.get("truncated") else ""
        lines = [f"corpus     {ix['corpus']}{cut}",
                 f"skipped    {ix['skipped']} files or records (unreadable or not UTF-8)",
                 f"tokenizer  {tok['name']}, vocab {tok['vocab_size']}, fingerprint {tok['fingerprint'][:12]}"]
        for split in SPLITS:
            s = ix["splits"][split]
            lines.append(f"{split:<10} {s['documents']:,} documents, {s['bytes']:,} bytes, {s['tokens']:,} tokens, "
                         f"{self.bytes_per_token(split):.3f} bytes/token")
        total = sum(ix["splits"][s]["bytes"] for s in SPLITS)
        how = "reused" if self.reused else f"built in {ix['seconds']:.1f} s ({total / 1e6 / ix['seconds']:.2f} MB/s)"
        lines.append(f"shards     {self.directory} ({self.dtype}), {how}")
        return "\n".join(lines)


def prepare_shards(corpus: Corpus, tok: AnyTokenizer, out_dir: str | os.PathLike, val_fraction: float = 0.01,
                   seed: int = 0, workers: int | None = None, max_bytes: int | None = None,
                   progress: bool = True) -> ShardDataset:
    """Tokenise `corpus` (its first `max_bytes` bytes when given) into shards in `out_dir`, or reuse the shards
    there when tokenizer, corpus content, `val_fraction` and `seed` are unchanged. One process at a time builds
    a folder's shards: another waits for it (then reuses them, when its settings are the same).

    `workers` processes tokenise in parallel (default: one per CPU).
    """
    _check_val_fraction(val_fraction)
    start = time.perf_counter()
    out = Path(out_dir)
    hashes, sizes = _scan(corpus, max_bytes, progress)
    n_bytes = sum(sizes)
    # What this pass read (the next one, if a single text is split below, sets them again).
    truncated, described, skipped = corpus.truncated, corpus.describe(), len(corpus.skipped)
    one_text, val_docs = _split(hashes, sizes, val_fraction, seed)
    key = _key(tok, hashes, val_fraction, seed)

    existing = _reused(out, key)  # without the lock: finished shards are reused as they are, even read-only
    if existing is not None:
        return existing
    scanned = time.perf_counter() - start

    def wait(pid: str) -> None:
        print(f"waiting for another process (pid {pid}) that builds shards in {out}", file=sys.stderr, flush=True)

    with locked_directory(out, wait):
        existing = _reused(out, key)  # built by the process waited for
        if existing is not None:
            return existing
        building = time.perf_counter()  # the build's time: scanning and tokenising, not waiting
        parts = _held_out_end(next(corpus.documents(max_bytes)), val_fraction) if one_text else None  # (train, val)
        dtype = token_dtype(tok.vocab_size)
        files = {split: f"{split}.{key[:16]}.bin" for split in SPLITS}
        writers = {split: _ShardWriter(out / f"{files[split]}.{os.getpid()}.tmp") for split in SPLITS}
        stats = {split: {"documents": 0, "bytes": 0} for split in SPLITS}
        workers = min(workers or os.cpu_count() or 1, math.ceil(n_bytes / BATCH_BYTES))
        try:
            batches = _batches(parts or corpus.documents(max_bytes), val_docs)
            with tqdm(total=n_bytes, desc=f"tokenising ({tok.name})", unit="B", unit_scale=True,
                      disable=not progress) as bar:
                for (split, docs, size), tokens in _encode_all(batches, tok, dtype, workers):
                    writers[split].write(tokens)
                    stats[split]["documents"] += len(docs)
                    stats[split]["bytes"] += size
                    bar.update(size)
            documents, read = (sum(s[field] for s in stats.values()) for field in ("documents", "bytes"))
            if (documents, read) != (len(hashes) + one_text, n_bytes):
                raise RuntimeError(f"the corpus changed while the shards were being built: {corpus.describe()}")
            for split in SPLITS:
                writers[split].commit(out / files[split])
        finally:
            for writer in writers.values():
                writer.discard()
        index = {
            "format": FORMAT, "key": key, "dtype": dtype.name,
            "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size,
                          "eos_id": tok.eos_id},
            "corpus": described, "skipped": skipped,
            "val_fraction": val_fraction, "seed": seed, "max_bytes": max_bytes, "truncated": truncated,
            "splits": {split: {"file": files[split], **stats[split], "tokens": writers[split].tokens,
                               "checksum": writers[split].checksum} for split in SPLITS},
            "seconds": scanned + time.perf_counter() - building,
        }
        write_text_atomic(out / INDEX, json.dumps(index, indent=2) + "\n")
        for path in out.iterdir():  # shards of earlier builds, and leftovers of interrupted ones (no other file)
            if SHARD_FILE.fullmatch(path.name) and path.name not in files.values():
                path.unlink()
        return ShardDataset(out)


def training_documents(corpus: Corpus, val_fraction: float = 0.01, seed: int = 0, max_bytes: int | None = None,
                       ) -> Iterator[str]:
    """The documents `prepare_shards` with these settings trains on (a single text: its part before the held-out
    end), without the validation ones: what a tokenizer for the run may learn from."""
    _check_val_fraction(val_fraction)
    hashes, sizes = _scan(corpus, max_bytes, progress=False)
    one_text, val_docs = _split(hashes, sizes, val_fraction, seed)
    if one_text:
        yield _held_out_end(next(corpus.documents(max_bytes)), val_fraction)[0]
        return
    for i, doc in enumerate(corpus.documents(max_bytes)):
        if i not in val_docs:
            yield doc


def _check_val_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")


def _split(hashes: list[bytes], sizes: list[int], val_fraction: float, seed: int) -> tuple[bool, set[int]]:
    """Whether the corpus is a single text whose end validates (then its parts are documents 0, training, and 1,
    validation), and the indices of the validation documents."""
    one_text = len(hashes) == 1 and val_fraction > 0
    return one_text, {1} if one_text else _val_documents(hashes, sizes, val_fraction, seed)


def _reused(out: Path, key: str) -> ShardDataset | None:
    """The finished shards of `key` in `out` (`_existing`), with the leftovers of killed builds cleared."""
    existing = _existing(out, key)
    if existing is not None:
        _remove_dead_leftovers(out)
    return existing


def _remove_dead_leftovers(out: Path) -> None:
    """Temporary shards (`*.bin.PID.tmp`) of builds whose process no longer runs (killed mid-build), where shards
    are reused rather than rebuilt (a build removes every leftover). POSIX only: elsewhere, no cheap liveness test."""
    if os.name != "posix":
        return
    for path in out.iterdir():
        name = SHARD_FILE.fullmatch(path.name)
        if name is None or name["pid"] is None:
            continue
        try:
            os.kill(int(name["pid"]), 0)  # signal 0: only whether the process exists
        except ProcessLookupError:
            with contextlib.suppress(OSError):  # (a read-only folder keeps them)
                path.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            pass


def _scan(corpus: Corpus, max_bytes: int | None, progress: bool) -> tuple[list[bytes], list[int]]:
    """A content hash and the UTF-8 bytes of each document."""
    hashes, sizes = [], []
    with tqdm(desc="reading corpus", unit="B", unit_scale=True, disable=not progress) as bar:
        for doc in corpus.documents(max_bytes):
            data = doc.encode("utf-8")
            hashes.append(hashlib.blake2b(data, digest_size=16).digest())
            sizes.append(len(data))
            bar.update(len(data))
    return hashes, sizes


def _existing(out: Path, key: str) -> ShardDataset | None:
    """The shards in `out` if they are complete, intact and built for `key`."""
    if not (out / INDEX).is_file():
        return None
    try:
        ds = ShardDataset(out)
    except ShardError as e:
        print(f"rebuilding shards: {e}")
        return None
    ds.reused = ds.index["key"] == key
    return ds if ds.reused else None


def _held_out_end(text: str, val_fraction: float) -> tuple[str, str]:
    """A single text as (training part, its last `val_fraction` of the UTF-8 bytes), cut at the line start nearest
    the cut point when one lies within half the held-out length of it (else at the cut point itself)."""
    if len(text) < 2:
        raise ValueError(f"val_fraction={val_fraction}: the corpus is one document of {len(text)} characters, too "
                         "short to hold out its end; use val_fraction=0 (--val-fraction 0)")
    data = text.encode("utf-8")
    n = len(data)
    cut = len(data[:round(n * (1 - val_fraction))].decode("utf-8", errors="ignore"))  # the character of that byte
    if not 0 < cut < len(text):
        side = "holds out none" if cut >= len(text) else "leaves none for training"
        first, last = (len(text[i].encode("utf-8")) for i in (0, -1))  # whole characters on either side
        raise ValueError(f"val_fraction={val_fraction}: of the single text's {n} bytes, it {side}; use one in "
                         f"[{last / n:.3g}, {1 - first / n:.6g}], or 0 for no validation")
    slack = (len(text) - cut) // 2
    starts = [i + 1 for i in (text.rfind("\n", 0, cut), text.find("\n", cut))
              if i >= 0 and 0 < i + 1 < len(text) and abs(i + 1 - cut) <= slack]
    if starts:
        cut = min(starts, key=lambda start: abs(start - cut))
    return text[:cut], text[cut:]


def _val_documents(hashes: list[bytes], sizes: list[int], val_fraction: float, seed: int) -> set[int]:
    """Indices of the validation documents, about `val_fraction` of the bytes: texts in the order of their seeded
    content hash, each taken that keeps the validation bytes within that share (larger ones are passed over), or,
    when none is that small, the smallest; never all. Copies of one text go to the same split, so none is trained
    on and validated on."""
    if val_fraction == 0:
        return set()
    copies: dict[bytes, list[int]] = {}
    for i, digest in enumerate(hashes):
        copies.setdefault(digest, []).append(i)
    if len(copies) < 2:
        raise ValueError(f"val_fraction={val_fraction}: the corpus is copies of a single text and the split is by "
                         f"document; use val_fraction=0 (--val-fraction 0), or a corpus of many documents (a "
                         "folder, JSON Lines)")
    salt = str(seed).encode()
    order = sorted(copies, key=lambda digest: hashlib.blake2b(digest, digest_size=16, key=salt).digest())
    size = {digest: sizes[ix[0]] * len(ix) for digest, ix in copies.items()}  # all copies of a text
    budget = val_fraction * sum(sizes)
    val: list[bytes] = []
    for digest in order:
        if size[digest] <= budget:
            val.append(digest)
            budget -= size[digest]
    if not val:
        val = [min(order, key=size.__getitem__)]
    return {i for digest in val for i in copies[digest]}


def _key(tok: AnyTokenizer, hashes: list[bytes], val_fraction: float, seed: int) -> str:
    """Hash of everything the shards depend on."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([FORMAT, SPLIT_RULE, tok.fingerprint(), val_fraction, seed]).encode())
    for digest in hashes:
        h.update(digest)
    return h.hexdigest()


def _batches(docs: Iterable[str], val_docs: set[int]) -> Iterator[Batch]:
    """Consecutive documents of one split, about BATCH_BYTES of text per batch, in corpus order."""
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for i, doc in enumerate(docs):
        split = "val" if i in val_docs else "train"
        pending[split].append(doc)
        sizes[split] += len(doc.encode("utf-8"))
        if sizes[split] >= BATCH_BYTES:
            yield split, pending[split], sizes[split]
            pending[split], sizes[split] = [], 0
    for split in SPLITS:
        if pending[split]:
            yield split, pending[split], sizes[split]


def encode_documents(tok: AnyTokenizer, docs: list[str], dtype: np.dtype) -> np.ndarray:
    """The token ids of each document followed by EOS, concatenated."""
    ids: list[int] = []
    for doc in docs:
        ids += tok.encode(doc)
        ids.append(tok.eos_id)
    return np.array(ids, dtype=dtype)


_worker_tokenizer: AnyTokenizer | None = None


def _init_worker(tok: AnyTokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tok


def _encode_in_worker(docs: list[str], dtype: np.dtype) -> np.ndarray:
    return encode_documents(_worker_tokenizer, docs, dtype)


def _encode_all(batches: Iterator[Batch], tok: AnyTokenizer, dtype: np.dtype,
                workers: int) -> Iterator[tuple[Batch, np.ndarray]]:
    """(batch, tokens) in batch order, tokenised by `workers` processes (in this one when workers == 1)."""
    if workers <= 1:
        for batch in batches:
            yield batch, encode_documents(tok, batch[1], dtype)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(tok,)) as pool:
        in_flight: deque = deque()
        for batch in batches:
            in_flight.append((batch, pool.apply_async(_encode_in_worker, (batch[1], dtype))))
            if len(in_flight) >= 2 * workers:  # bounded: the corpus is never all in memory
                batch, result = in_flight.popleft()
                yield batch, result.get()
        for batch, result in in_flight:
            yield batch, result.get()


class _ShardWriter:
    """Appends token arrays to a temporary file, hashing them; `commit` renames it into place."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("wb")
        self.hash = hashlib.blake2b(digest_size=16)
        self.tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.tokens += len(tokens)

    @property
    def checksum(self) -> str:
        return self.hash.hexdigest()

    def commit(self, final: Path) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.path, final)

    def discard(self) -> None:
        """Close and delete the temporary file if it was not committed."""
        self.file.close()
        self.path.unlink(missing_ok=True)


def _checksum(tokens: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(tokens).cast("B"), digest_size=16).hexdigest()
