"""Files written whole or not at all: a reader (or a resumed run) never sees a half-written one; and locks that
let one process at a time write a folder."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, flush it to disk, then rename it over `path` (a failed write
    removes the temporary file and leaves `path` as it was)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_figure_atomic(fig: Any, path: Path, **savefig_kwargs: Any) -> None:
    """Lay out a matplotlib figure, write it to a temporary file beside `path` (of its format), rename that
    over `path` and close the figure: a kill leaves the previous image or the new one, never a torn one."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    fig.savefig(tmp, **savefig_kwargs)
    plt.close(fig)
    tmp.replace(path)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked_directory(directory: Path, on_busy: Callable[[str], None]) -> Iterator[None]:
    """Make `directory` and hold an exclusive lock on its LOCK_FILE while the context lasts, with this process's
    id written in it; the OS releases it however the process ends. When another process holds it, `on_busy(its
    pid, or '?')` is called first: it raises to refuse, or returns to wait for the lock. A directory made here
    that holds nothing else at the end is removed. No lock where the OS has no `fcntl` (Windows)."""
    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with _exclusive_lock(directory / LOCK_FILE, on_busy):
            yield
    finally:
        if made and [p.name for p in directory.iterdir()] == [LOCK_FILE]:  # nothing written: no trace left
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path, on_busy: Callable[[str], None]) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:
        yield
        return
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            on_busy(handle.read().strip() or "?")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
