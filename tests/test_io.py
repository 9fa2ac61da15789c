"""Files written whole or not at all; folder locks."""

from __future__ import annotations

import os

import pytest

from mixcon.io import LOCK_FILE, locked_directory, write_text_atomic


def test_a_failed_write_leaves_the_file_as_it_was_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    write_text_atomic(path, "old\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
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
