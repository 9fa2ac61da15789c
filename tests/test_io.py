"""Files written whole or not at all; folder locks."""

from __future__ import annotations

import os
import sys
import time

import pytest

from mixcon.io import LOCK_FILE, locked_directory, save_figure_atomic, write_text_atomic


def test_a_failed_write_leaves_the_file_as_it_was_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    write_text_atomic(path, "old\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_write_interrupted_by_ctrl_c_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A KeyboardInterrupt (not an Exception) mid-write removes the temporary file too and reaches the caller."""
    path = tmp_path / "metrics.jsonl"
    write_text_atomic(path, "old\n")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_held_lock_names_its_holder_and_refuses_or_waits(tmp_path):
    folder = tmp_path / "run"
    seen = []

    def refuse(pid: str) -> None:
        seen.append(pid)
        raise RuntimeError("busy")

    with locked_directory(folder, refuse):
        assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RuntimeError, match="busy"), locked_directory(folder, refuse):
            pass
        (folder / "kept").write_text("")
    assert seen == [str(os.getpid())]
    with locked_directory(folder, refuse):  # released: taken without calling on_busy
        pass
    assert seen == [str(os.getpid())] and (folder / "kept").exists()
    with locked_directory(tmp_path / "empty", refuse):
        pass
    assert not (tmp_path / "empty").exists()  # made for the lock alone, and removed with it


def test_a_waiter_gets_the_directory_back_when_the_holder_removes_it(tmp_path):
    """The holder made the folder and wrote nothing: it removes it before letting go, and the process that waited
    for its lock makes the folder anew and locks it (it used to be left with a folder gone under it)."""
    import threading

    folder = tmp_path / "shards"
    waiting, wrote, holder_done = threading.Event(), [], []

    def waiter() -> None:
        with locked_directory(folder, lambda pid: waiting.set()):
            wrote.append(list(holder_done))  # the holder had finished before the waiter got in
            (folder / "train.bin").write_text("built")
            wrote.append((folder / LOCK_FILE).read_text())

    with locked_directory(folder, lambda pid: None):
        thread = threading.Thread(target=waiter)
        thread.start()
        assert waiting.wait(30)
        time.sleep(0.2)  # a waiter that did not wait would be inside by now
        holder_done.append(True)
    thread.join(30)
    assert wrote == [[True], f"{os.getpid()}\n"] and (folder / "train.bin").read_text() == "built"


def test_a_folder_removed_between_making_it_and_locking_it_is_made_again(tmp_path, monkeypatch):
    """Its holder let go of a folder it made for nothing just as this process made and opened it."""
    import shutil

    from mixcon import io

    folder, lock = tmp_path / "shards", io._lock
    calls = []

    def removed_first(fcntl, path, on_busy):
        calls.append(path)
        if len(calls) == 1:
            shutil.rmtree(folder)
        return lock(fcntl, path, on_busy)

    monkeypatch.setattr(io, "_lock", removed_first)
    with locked_directory(folder, lambda pid: None):
        (folder / "kept").write_text("")
    assert len(calls) == 2 and (folder / "kept").exists()


@pytest.mark.parametrize("fcntl", [True, False], ids=["fcntl", "no-fcntl"])  # (no fcntl: Windows, no lock)
def test_a_lock_made_for_nothing_takes_its_new_parents_with_it(tmp_path, monkeypatch, fcntl):
    """`mixcon train --out runs/x` refused after locking: neither runs/x nor runs/ is left behind, but a parent
    that holds something else stays; a transient folder goes whoever made it."""
    if not fcntl:
        monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    (tmp_path / "transient").mkdir()
    with locked_directory(tmp_path / "transient", lambda pid: None, transient=True):
        pass
    with locked_directory(tmp_path / "runs" / "a" / "x", lambda pid: None):
        pass
    assert list(tmp_path.iterdir()) == []
    with locked_directory(tmp_path / "runs" / "a" / "x", lambda pid: None):
        (tmp_path / "runs" / "kept").write_text("")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["kept"]


@pytest.mark.parametrize("fcntl", [True, False], ids=["fcntl", "no-fcntl"])
def test_a_folder_that_existed_or_was_written_in_stays(tmp_path, monkeypatch, fcntl):
    """Only an empty folder made for the lock (or a transient one) is removed: one that was there before, or that
    holds what was written in it, is left as it is."""
    if not fcntl:
        monkeypatch.setitem(sys.modules, "fcntl", None)
    (tmp_path / "there").mkdir()
    with locked_directory(tmp_path / "there", lambda pid: None):
        pass
    with locked_directory(tmp_path / "made" / "x", lambda pid: None):
        (tmp_path / "made" / "x" / "kept").write_text("")
    assert (tmp_path / "there").is_dir() and (tmp_path / "made" / "x" / "kept").is_file()


def test_a_crashed_holders_lock_file_is_rewritten_and_a_transient_folder_removed(tmp_path):
    """The folder and a lock file with a dead process's id are left by a crash: the lock file then names this
    process alone; a transient folder (it exists for its lock) goes at the end though this process did not make
    it, any other does not."""
    for transient in (True, False):
        folder = tmp_path / f"transient-{transient}"
        folder.mkdir()
        (folder / LOCK_FILE).write_text("4194304\n")
        with locked_directory(folder, lambda pid: pytest.fail("nobody holds it"), transient=transient):
            assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert folder.exists() is not transient


def test_a_holder_that_has_not_written_its_id_is_named_with_a_question_mark(tmp_path):
    import fcntl

    folder = tmp_path / "run"
    folder.mkdir()
    with (folder / LOCK_FILE).open("a") as holder:  # locked, still empty
        fcntl.flock(holder, fcntl.LOCK_EX)
        seen = []

        def refuse(pid: str) -> None:
            seen.append(pid)
            raise RuntimeError("busy")

        with pytest.raises(RuntimeError, match="busy"), locked_directory(folder, refuse):
            pass
    assert seen == ["?"]


def test_a_waiter_whose_lock_file_was_replaced_waits_for_the_new_one(tmp_path):
    """The holder removed the folder, and a third process made it anew and locked its new lock file, before the
    waiter got the old file's lock: the waiter locks the new file, after the third process, not beside it."""
    import fcntl
    import shutil
    import threading

    folder = tmp_path / "run"
    folder.mkdir()
    holder = (folder / LOCK_FILE).open("a")
    fcntl.flock(holder, fcntl.LOCK_EX)
    waits, inside = threading.Semaphore(0), []

    def waiter() -> None:
        with locked_directory(folder, lambda pid: waits.release()):
            inside.append(list(third_done))

    third_done: list[bool] = []
    thread = threading.Thread(target=waiter)
    thread.start()
    assert waits.acquire(timeout=30)  # blocked on the old lock file
    shutil.rmtree(folder)
    with locked_directory(folder, lambda pid: pytest.fail("the new folder is free")):
        holder.close()  # the waiter gets the old file's lock: not the folder's
        assert waits.acquire(timeout=30)  # ... and waits again, for the new file
        time.sleep(0.2)
        assert inside == []
        third_done.append(True)
    thread.join(30)
    assert inside == [[True]]


def test_a_figure_that_fails_to_save_is_closed_and_leaves_the_old_image(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot", reason="matplotlib is not installed")
    path = tmp_path / "loss.png"
    fig = plt.figure()
    save_figure_atomic(fig, path)
    old = path.read_bytes()
    assert not plt.fignum_exists(fig.number)
    fig = plt.figure()
    with pytest.raises((TypeError, ValueError)):
        save_figure_atomic(fig, path, dpi="bad")
    assert not plt.fignum_exists(fig.number)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["loss.png"]
