"""The one atomic-write helper: whole files or none, old files kept on failure, modes kept, all on disk."""

from __future__ import annotations

import os
import stat

import pytest

import triage.atomic
from triage.atomic import atomic_write, atomic_write_text, atomic_write_texts
from triage.errors import TriageError


def record_fsyncs(monkeypatch: pytest.MonkeyPatch, fail_on: int | None = None) -> list[str]:
    """Replace os.fsync by one that records "file" or "folder" per call, and fails on call `fail_on`."""
    real_fsync, kinds = os.fsync, []

    def fsync(descriptor: int) -> None:
        kinds.append("folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
        if len(kinds) == fail_on:
            raise OSError(28, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(triage.atomic.os, "fsync", fsync)
    return kinds


def test_writes_the_content_and_syncs_the_file_then_the_folder(tmp_path, monkeypatch):
    kinds = record_fsyncs(monkeypatch)
    path = tmp_path / "new" / "page.html"  # the folder is created
    atomic_write_text(path, "héllo\n")
    assert path.read_bytes() == "héllo\n".encode()
    atomic_write(path, lambda handle: handle.write(b"\x00bytes"))
    assert path.read_bytes() == b"\x00bytes"
    assert kinds == ["file", "folder", "file", "folder"]
    assert os.listdir(path.parent) == ["page.html"]


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "part.parquet"
    path.write_text("old")

    def half_then_fail(handle) -> None:
        handle.write(b"half a fi")
        raise RuntimeError("the writer crashed")

    with pytest.raises(RuntimeError, match="the writer crashed"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["part.parquet"]


def test_several_files_all_or_none(tmp_path, monkeypatch):
    first, second = tmp_path / "a.json", tmp_path / "b.md"
    first.write_text("old a")
    second.write_text("old b")
    record_fsyncs(monkeypatch, fail_on=2)  # the second file's fsync: nothing renamed yet
    with pytest.raises(TriageError, match=r"could not write .*b\.md: No space left on device"):
        atomic_write_texts({first: "new a", second: "new b"})
    assert (first.read_text(), second.read_text()) == ("old a", "old b")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.md"]

    monkeypatch.undo()
    atomic_write_texts({first: "new a", second: "new b"})
    assert (first.read_text(), second.read_text()) == ("new a", "new b")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.md"]


def test_a_replaced_file_keeps_its_mode_and_a_new_one_gets_opens_mode(tmp_path):
    kept = tmp_path / "report.html"
    kept.write_text("old")
    kept.chmod(0o640)
    atomic_write_text(kept, "new")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640

    plain = tmp_path / "plain"
    plain.write_text("")  # what open() gives a new file under this process's umask (not mkstemp's 0600)
    new = tmp_path / "new.json"
    atomic_write_text(new, "{}")
    assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_an_unwritable_target_raises_oserror_and_leaves_nothing(tmp_path):
    folder = tmp_path / "taken"
    folder.mkdir()
    with pytest.raises(OSError):
        atomic_write_text(folder, "a file where a folder is")  # os.replace cannot put a file over a folder
    assert os.listdir(tmp_path) == ["taken"] and os.listdir(folder) == []
