"""Reading transcripts: which files, and their rows one at a time.

Every row read becomes one record `{"call_id", "transcript", "input_error"}`; a row that
cannot be used (a malformed JSON line, a missing or empty transcript) still becomes a
record, with the reason in `input_error`, so it reaches the output instead of vanishing.
A file that cannot be read at all (missing, unknown format, no `transcript` column) is
an `InputError` raised before any work starts.

Rows without a `call_id` get `<file name>:<row number>` (1-based), so a rerun over the
same files gives the same ids. A `call_id` given to more than one row is made unique on every
such row as `<call_id>@<file name>:<row number>` (`scan_inputs` finds them first).

One numbering names a row everywhere, in its id and in its error message:
- JSONL and text: the row's line in the file. Blank lines are not rows, but they are counted,
  so `calls.jsonl:12` and `line 12: invalid JSON` both name line 12, whatever precedes it.
- CSV: the record's position after the header (a quoted field may span several lines).
- Parquet: the row's position in the file.

A UTF-8 byte-order mark at the start of a file (as Excel writes CSV) is not part of the data.
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from triage.errors import InputError

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
TRANSCRIPT = "transcript"
CALL_ID = "call_id"

Record = dict[str, Any]
# What a format's reader yields per row: its number (see above), the raw fields, or why it has none.
Numbered = tuple[int, dict[str, Any] | None, str | None]


def resolve_input_files(spec: str) -> list[Path]:
    """The files named by a path, a folder (its supported files, sorted) or a glob."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise InputError(f"input folder {spec} holds no {_format_list()} files")
        return files
    if path.is_file():
        _format_of(path)
        return [path]
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"input glob {spec} matches no files")
        for file in files:
            _format_of(file)
        return files
    raise InputError(f"input {spec} does not exist")


def _format_list() -> str:
    return ", ".join(sorted(FORMATS))


def _format_of(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise InputError(
            f"input {path}: unsupported format {path.suffix or '(no extension)'!r}; use one of {_format_list()}"
        ) from None


def check_input_file(path: Path) -> None:
    """Fail fast, before Ray starts, on a file whose header has no `transcript` column."""
    fmt = _format_of(path)
    if fmt == "parquet":
        try:
            names = pq.read_schema(path).names
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise InputError(f"input {path}: not a readable Parquet file ({exc})") from None
        if TRANSCRIPT not in names:
            raise InputError(f"input {path}: no '{TRANSCRIPT}' column (columns: {', '.join(names)})")
    elif fmt == "csv":
        with _open_text(path) as handle:
            header = next(csv.reader(handle), [])
        if TRANSCRIPT not in [name.strip() for name in header]:
            raise InputError(f"input {path}: no '{TRANSCRIPT}' column in the CSV header ({', '.join(header)})")
    elif fmt == "jsonl":
        _check_first_json_record(path)


def _check_first_json_record(path: Path) -> None:
    with _open_text(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                first = json.loads(line)
            except json.JSONDecodeError:
                return  # reported per line while reading
            if isinstance(first, dict) and TRANSCRIPT not in first:
                raise InputError(f"input {path}: first record has no '{TRANSCRIPT}' field (fields: {', '.join(first)})")
            return


def _open_text(path: Path) -> io.TextIOWrapper:
    # Invalid UTF-8 is replaced, not fatal: the affected row is flagged by read_rows.
    # "utf-8-sig" drops a byte-order mark at the start of the file, and only there.
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def _binary_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The lines of a file with their 1-based numbers, a byte-order mark at the start removed."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            yield number, line.removeprefix(codecs.BOM_UTF8) if number == 1 else line


def read_rows(path: Path, duplicates: frozenset[str] | set[str] = frozenset()) -> Iterator[Record]:
    """Yield one record per row of `path`, in file order, without holding the file in memory.

    `duplicates` are call_ids that appear more than once in the whole input.
    """
    for _, record in _numbered_records(path, duplicates):
        yield record


def _numbered_records(path: Path, duplicates: frozenset[str] | set[str]) -> Iterator[tuple[int, Record]]:
    reader = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows, "text": _text_rows}[_format_of(path)]
    for number, raw, problem in reader(path):
        yield number, _record(path, number, raw, problem, duplicates)


@dataclass(frozen=True)
class InputScan:
    """What the driver learns from one streamed pass over the input: ids only, never transcripts."""

    rows: int
    duplicates: frozenset[str]
    call_ids: list[str]  # final ids of the rows a run covers (the first `limit` rows), in input order


def scan_inputs(files: list[Path], limit: int | None = None) -> InputScan:
    seen: set[str] = set()
    duplicates: set[str] = set()
    located: list[tuple[str, str, int]] = []
    for file in files:
        for number, record in _numbered_records(file, frozenset()):
            call_id = record[CALL_ID]
            (duplicates if call_id in seen else seen).add(call_id)
            if limit is None or len(located) < limit:
                located.append((call_id, file.name, number))
    call_ids = [
        _unique_id(call_id, name, number) if call_id in duplicates else call_id for call_id, name, number in located
    ]
    return InputScan(rows=len(located), duplicates=frozenset(duplicates), call_ids=call_ids)


def _unique_id(call_id: str, file_name: str, number: int) -> str:
    return f"{call_id}@{file_name}:{number}"


def _record(
    path: Path, number: int, raw: dict[str, Any] | None, problem: str | None, duplicates: frozenset[str] | set[str]
) -> Record:
    raw = raw or {}
    call_id = raw.get(CALL_ID)
    if call_id is None or (isinstance(call_id, float) and call_id != call_id) or str(call_id).strip() == "":
        call_id = f"{path.name}:{number}"
    elif str(call_id) in duplicates:
        call_id = _unique_id(str(call_id), path.name, number)
    transcript = raw.get(TRANSCRIPT)
    problem = problem or transcript_problem(transcript)
    # A row with a problem keeps no transcript: that is what tells the stages to skip it.
    return {CALL_ID: str(call_id), TRANSCRIPT: None if problem else transcript, "input_error": problem}


def transcript_problem(transcript: Any) -> str | None:
    """Why a transcript cannot be triaged, or None. Such rows cost no LM call."""
    if transcript is None or (isinstance(transcript, float) and transcript != transcript):
        return "missing transcript"
    if not isinstance(transcript, str):
        return f"transcript is not text ({type(transcript).__name__})"
    if not transcript.strip():
        return "empty transcript"
    return None


def _jsonl_rows(path: Path) -> Iterator[Numbered]:
    for number, line in _binary_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            yield number, None, f"line {number}: not valid UTF-8"
            continue
        except json.JSONDecodeError as exc:
            yield number, None, f"line {number}: invalid JSON ({exc.msg})"
            continue
        if not isinstance(value, dict):
            yield number, None, f"line {number}: expected a JSON object, got {type(value).__name__}"
            continue
        yield number, value, None


def _csv_rows(path: Path) -> Iterator[Numbered]:
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        for number, row in enumerate(reader, start=1):
            yield number, row, ("not valid UTF-8" if "\ufffd" in (row.get(TRANSCRIPT) or "") else None)


def _parquet_rows(path: Path) -> Iterator[Numbered]:
    parquet = pq.ParquetFile(path)
    columns = [c for c in (CALL_ID, TRANSCRIPT) if c in parquet.schema_arrow.names]
    number = 0
    for batch in parquet.iter_batches(batch_size=4096, columns=columns):
        for row in batch.to_pylist():
            number += 1
            yield number, row, None


def _text_rows(path: Path) -> Iterator[Numbered]:
    for number, line in _binary_lines(path):
        text = line.rstrip(b"\r\n")
        if not text.strip():
            continue
        try:
            yield number, {TRANSCRIPT: text.decode("utf-8")}, None
        except UnicodeDecodeError:
            yield number, None, f"line {number}: not valid UTF-8"
