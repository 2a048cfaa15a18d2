"""Files written whole or not at all: the part files, the manifest, the report page, optimize's programs.

Each file is written to a hidden temporary file in its own folder (`.<name>.<random>.tmp`: readers
such as pyarrow skip names starting with "."), flushed and fsynced, renamed over the final name
(`os.replace`, atomic on one file system), and then the folder is fsynced so the rename itself
survives a crash. A reader sees the old file or the new one, never half of one; when writing fails,
the old file stays as it was and the temporary file is removed.

The new file keeps the mode of the file it replaces; a file that did not exist gets the mode `open()`
would give it (0666 less the umask), not the 0600 of `tempfile.mkstemp`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from triage.errors import TriageError

TEMP_SUFFIX = ".tmp"

Writer = Callable[[BinaryIO], object]


def atomic_write(path: Path, write: Writer) -> None:
    """Replace `path` with what `write(handle)` writes to a binary file handle. Raises what the writing raises."""
    temporary = _stage(path, write)
    try:
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8). Raises OSError when it cannot."""
    atomic_write(path, _text_writer(text))


def atomic_write_texts(files: Mapping[Path, str]) -> None:
    """Write every file (UTF-8) to its temporary file first, then rename them all into place.

    If anything fails before the renames (a full disk, an interrupt), every old file stays as it was
    and no temporary file is left behind. Raises TriageError naming the file that could not be written.
    """
    temporary: dict[Path, Path] = {}
    path: Path | None = None
    try:
        for path, text in files.items():
            temporary[path] = _stage(path, _text_writer(text))
        for path, temp in temporary.items():
            os.replace(temp, path)
        for path in dict.fromkeys(p.parent for p in temporary):
            _fsync_folder(path)
    except OSError as exc:
        raise TriageError(f"could not write {path}: {exc.strerror or exc}") from exc
    finally:
        for temp in temporary.values():
            temp.unlink(missing_ok=True)


def _stage(path: Path, write: Writer) -> Path:
    """A temporary file beside `path` (its folder created if need be) holding what `write` wrote, on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # less the umask
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if path.exists():
                os.fchmod(handle.fileno(), path.stat().st_mode & 0o777)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _text_writer(text: str) -> Writer:
    data = text.encode("utf-8")
    return lambda handle: handle.write(data)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: fsync the directory itself)."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
