"""The output dataset on disk: Parquet part files that are either whole or absent.

Each write task writes its rows to a hidden temporary file in the output folder and renames
it into place (`os.replace`, atomic on one file system). A run killed at any moment leaves
only whole part files and, at worst, hidden temporaries, which readers ignore (pyarrow skips
names starting with "." or "_") and the next run deletes. The call_ids in the whole part
files are the rows already done: a rerun into the same folder skips them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from triage.errors import ConfigError
from triage.schema import OUTPUT_SCHEMA

PART_PREFIX = "part-"
TEMP_SUFFIX = ".tmp"


class AtomicParquetSink(Datasink[int]):
    """Writes blocks as `part-<uuid>.parquet` files, each renamed into place when complete."""

    def __init__(self, folder: str | Path, rows_per_file: int) -> None:
        self.folder = str(folder)
        self.rows_per_file = rows_per_file
        self.rows_written = 0

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx: Any) -> int:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA) for t in tables if t.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables)
        name = f"{PART_PREFIX}{uuid.uuid4().hex}.parquet"
        temporary = os.path.join(self.folder, f".{name}{TEMP_SUFFIX}")
        pq.write_table(table, temporary)
        os.replace(temporary, os.path.join(self.folder, name))
        return table.num_rows

    def on_write_complete(self, write_result: Any) -> None:
        self.rows_written = sum(write_result.write_returns)

    def get_name(self) -> str:
        return "AtomicParquet"


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


def _is_ours(path: Path) -> bool:
    name = path.name
    return path.is_file() and (
        (name.startswith(PART_PREFIX) and name.endswith(".parquet"))
        or (name.startswith(f".{PART_PREFIX}") and name.endswith(TEMP_SUFFIX))
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
