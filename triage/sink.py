"""The output dataset on disk: Parquet part files that are either whole or absent.

The driver writes each part to a hidden temporary file in the output folder and renames it
into place (`triage.atomic`: fsynced, then `os.replace`, atomic on one file system). A run killed at any moment leaves
only whole part files and, at worst, hidden temporaries, which readers ignore (pyarrow skips
names starting with "." or "_") and the next run deletes. The call_ids in the whole part
files are the rows already done: a rerun into the same folder skips them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from triage.atomic import TEMP_SUFFIX, atomic_write
from triage.errors import ConfigError
from triage.journal import Journal, journal_files, read_journal
from triage.schema import OUTPUT_SCHEMA, to_output

PART_PREFIX = "part-"

logger = logging.getLogger("triage")


class PartWriter:
    """Collects output batches on the driver and commits them as `part-<uuid>.parquet` files.

    A part is committed when it holds `rows_per_file` rows or when `seconds_per_file` have passed
    since the last commit (so a slow model still commits its work often), and at `close()`.
    Until then each batch is in the journal (`journal=False`: not even there).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        rows_per_file: int,
        seconds_per_file: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        journal: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.journal = Journal(self.folder) if journal else None
        self.rows_per_file = rows_per_file
        self.seconds_per_file = seconds_per_file
        self.clock = clock
        self.rows_written = 0
        self.files_written = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._last_commit = clock()

    def add(self, batch: pa.Table) -> None:
        if batch.num_rows:
            table = to_output(batch)
            self._pending.append(table)
            self._pending_rows += batch.num_rows
            if self.journal is not None:
                self.journal.append(table)
        if self._pending_rows >= self.rows_per_file or (
            self._pending_rows and self.clock() - self._last_commit >= self.seconds_per_file
        ):
            self.commit()

    def commit(self) -> None:
        if self._pending_rows:
            write_part(self.folder, pa.concat_tables(self._pending))
            self.rows_written += self._pending_rows
            self.files_written += 1
        if self.journal is not None:
            self.journal.discard()  # its rows are in the part now (a kill before this line: see recover_journals)
        self._pending, self._pending_rows = [], 0
        self._last_commit = self.clock()

    close = commit


def write_part(folder: Path, table: pa.Table) -> Path:
    """Write `table` as a new part file: to a hidden temporary name first, then renamed into place."""
    final = folder / f"{PART_PREFIX}{uuid.uuid4().hex}.parquet"
    atomic_write(final, lambda handle: pq.write_table(table, handle))
    return final


def prepare_output_folder(folder: Path, *, overwrite: bool) -> None:
    """Create the folder, delete leftovers of a killed run, and with `overwrite` the earlier parts.

    Refuses a folder holding anything but this dataset: a typo in --output must not delete data.
    """
    if folder.is_file():
        raise ConfigError(f"output {folder} is a file; give a folder for the Parquet dataset")
    folder.mkdir(parents=True, exist_ok=True)
    strangers = [p.name for p in folder.iterdir() if not _is_ours(p)]
    if strangers:
        raise ConfigError(
            f"output folder {folder} holds files that are not this dataset's ({', '.join(sorted(strangers)[:3])}); "
            "choose another --output"
        )
    for path in folder.iterdir():
        if path.name.endswith(TEMP_SUFFIX) or (overwrite and path.name.startswith(PART_PREFIX)):
            path.unlink()
    if overwrite:
        for path in journal_files(folder):
            path.unlink()
    recover_journals(folder)


def recover_journals(folder: Path) -> int:
    """Commit the rows in journals a killed run left behind as one part file, then delete the journals.

    Rows whose call_id a part file already holds are left out (the run was killed after committing
    them but before deleting their journal), so every row is in the dataset exactly once however
    often this is interrupted. Returns the rows committed.
    """
    journals = journal_files(folder)
    if not journals:
        return 0
    done = completed_ids(folder)
    keep: list[int] = []
    table = pa.concat_tables([read_journal(path) for path in journals])
    for index, call_id in enumerate(table.column("call_id").to_pylist()):
        if call_id not in done:
            done.add(call_id)
            keep.append(index)
    if keep:
        write_part(folder, table.take(keep))
        logger.info("%d finished rows of an interrupted run recovered from its journal", len(keep))
    for path in journals:
        path.unlink()
    return len(keep)


def _is_ours(path: Path) -> bool:
    name = path.name
    return path.is_file() and (
        (name.startswith(PART_PREFIX) and name.endswith(".parquet"))
        or (name.startswith(".") and name.endswith(TEMP_SUFFIX))
        or name.startswith("_")
    )


def read_output(folder: Path, columns: list[str] | None = None) -> pa.Table:
    """The part files of the dataset (empty table with the schema when there are none)."""
    parts = sorted(folder.glob(f"{PART_PREFIX}*.parquet")) if folder.is_dir() else []
    if not parts:
        return OUTPUT_SCHEMA.empty_table().select(columns or OUTPUT_SCHEMA.names)
    return pads.dataset([str(p) for p in parts], format="parquet", schema=OUTPUT_SCHEMA).to_table(columns=columns)


def completed_ids(folder: Path) -> set[str]:
    """call_ids already written by earlier runs into `folder`."""
    return set(read_output(folder, ["call_id"]).column("call_id").to_pylist())
