"""The input as a Ray Data source: one read task per file, blocks of a fixed number of rows.

Block boundaries are what the stages hand on to each other, so blocks are kept small (one
batch each): rows then stream through both stages instead of the details stage waiting for
the triage stage to finish a whole file. Each block already has the output schema; rows
whose call_id is not in `to_do` (done by an earlier run, or past `--limit`) are left out,
and overlong transcripts are cut, with a note in `review` (the answers saw only the start).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from triage.inputs import read_rows
from triage.schema import WORKING_SCHEMA

INPUT_ERROR_PREFIX = "input: "


def prepared_rows(
    path: Path, *, model: str, duplicates: frozenset[str], to_do: frozenset[str], max_chars: int
) -> Iterator[dict[str, Any]]:
    """The rows of one file as output records, before any stage has run."""
    for record in read_rows(path, duplicates):
        if record["call_id"] not in to_do:
            continue
        problem, transcript, review = record["input_error"], record["transcript"], None
        if transcript is not None and len(transcript) > max_chars:
            review = f"transcript cut to {max_chars} of {len(transcript)} characters: the answers saw only the start"
            transcript = transcript[:max_chars]
        yield {
            "call_id": record["call_id"],
            "transcript": transcript,
            "review": review,
            "errors": f"{INPUT_ERROR_PREFIX}{problem}" if problem else None,
            "model": model,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_prompt_tokens": 0,
            "triaged_at": datetime.now(UTC),
        }


def _blocks(rows: Iterator[dict[str, Any]], rows_per_block: int) -> Iterator[pa.Table]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == rows_per_block:
            yield pa.Table.from_pylist(chunk, schema=WORKING_SCHEMA)
            chunk = []
    if chunk:
        yield pa.Table.from_pylist(chunk, schema=WORKING_SCHEMA)


class TranscriptSource(Datasource):
    def __init__(
        self,
        files: list[Path],
        *,
        model: str,
        duplicates: frozenset[str],
        to_do: frozenset[str],
        max_chars: int,
        rows_per_block: int,
    ) -> None:
        super().__init__()
        self.files = [str(f.resolve()) for f in files]
        self.options = {"model": model, "duplicates": duplicates, "to_do": to_do, "max_chars": max_chars}
        self.rows_per_block = rows_per_block

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(Path(f).stat().st_size for f in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, **_: Any) -> list[ReadTask]:
        tasks = []
        for file in self.files:

            def read(file: str = file) -> Iterator[pa.Table]:
                yield from _blocks(prepared_rows(Path(file), **self.options), self.rows_per_block)

            metadata = BlockMetadata(
                num_rows=None, size_bytes=Path(file).stat().st_size, input_files=[file], exec_stats=None
            )
            tasks.append(ReadTask(read, metadata, schema=WORKING_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks
