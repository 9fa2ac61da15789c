"""Files written whole or not at all: a reader (or a resumed run) never sees a half-written one; and locks that
let one process at a time write a folder."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def fsync_path(path: Path) -> None:
    """Flush a written file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """`write(tmp)` a temporary file beside `path` (named with `suffix` last: a format some writers read off
    the name), flush it to disk and rename it over `path`; a failed write removes the temporary file and leaves
    `path` as it was."""
    tmp = path.with_name(path.name + ".tmp" + suffix)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (`write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def save_figure_atomic(fig: Any, path: Path, **savefig_kwargs: Any) -> None:
    """Lay out a matplotlib figure, write it to `path` whole or not at all (`write_atomic`: a kill leaves the
    previous image or the new one, never a torn one), and close it, written or not."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        write_atomic(path, lambda tmp: fig.savefig(tmp, **savefig_kwargs), suffix=path.suffix)
    finally:
        plt.close(fig)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked_directory(directory: Path, on_busy: Callable[[str], None], transient: bool = False) -> Iterator[None]:
    """Make `directory` and hold an exclusive lock on its LOCK_FILE while the context lasts, with this process's
    id written in it; the OS releases it however the process ends. When another process holds it, `on_busy(its
    pid, or '?')` is called first: it raises to refuse, or returns to wait for the lock. A directory made here
    (or any, when `transient`: one that exists only for the lock, a crashed holder's included) that holds nothing
    else at the end is removed, with the parents made for it that are then empty (before the lock is let go: a
    process waiting for it then makes the directory anew). No lock where the OS has no `fcntl` (Windows)."""
    try:
        import fcntl
    except ImportError:
        made = _missing(directory)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            yield
        finally:
            if (made or transient) and not any(p.name != LOCK_FILE for p in directory.iterdir()):
                _remove(directory, made)
        return
    handle = None
    while handle is None:
        made = _missing(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle = _lock(fcntl, directory / LOCK_FILE, on_busy)
        except (FileNotFoundError, FileExistsError):  # removed by its holder meanwhile (mkdir, open, wait): again
            handle = None
    with handle:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            if (made or transient) and [p.name for p in directory.iterdir()] == [LOCK_FILE]:  # nothing else: no trace
                _remove(directory, made)


def _missing(directory: Path) -> list[Path]:
    """`directory` and those of its parents that do not exist, innermost first."""
    return [p for p in (directory, *directory.parents) if not p.exists()]


def _remove(directory: Path, made: list[Path]) -> None:
    """Remove `directory`, then the parents in `made` while they are empty."""
    shutil.rmtree(directory, ignore_errors=True)
    for parent in made[1:]:
        try:
            parent.rmdir()
        except OSError:  # something else is in it (or it is gone already)
            break


def _lock(fcntl: Any, path: Path, on_busy: Callable[[str], None]) -> IO[str] | None:
    """`path` opened and locked, or None when another file took its name while this process waited for it
    (FileNotFoundError when it is gone)."""
    handle = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            on_busy(handle.read().strip() or "?")
            fcntl.flock(handle, fcntl.LOCK_EX)
        held, named = os.fstat(handle.fileno()), os.stat(path)
    except BaseException:
        handle.close()
        raise
    if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
        return handle
    handle.close()
    return None
