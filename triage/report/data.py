"""Reading a triaged dataset and its run manifest into one `Report`.

`build_report` reads the Parquet dataset (priority and category as text, None when null, with
every known level) and the `_manifest.json` beside it, flattened to (key, text) rows. The manifest
is untrusted: its text goes through `redact`, and secret-named keys are masked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from triage.errors import InputError, first_line, redact
from triage.manifest import MANIFEST_NAME
from triage.programs import CATEGORIES, PRIORITIES
from triage.schema import OUTPUT_COLUMNS, OUTPUT_SCHEMA

REQUIRED_COLUMNS = ("call_id", "priority", "category", "errors", "prompt_tokens", "completion_tokens")
UNDER_TRIAGE_REASON = "possible under-triage"
MASK = "****"

_SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|credential|authorization|(^|[_.-])token$)", re.I)


@dataclass
class Manifest:
    """The run's `_manifest.json`, flattened to (key, text) rows with secrets masked."""

    path: Path
    rows: list[tuple[str, str]] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


@dataclass
class Report:
    """What the page shows, computed once from the dataset and the manifest."""

    source: Path
    calls: pd.DataFrame
    priorities: list[str]
    categories: list[str]
    manifest: Manifest | None
    generated_at: datetime

    @property
    def urgent(self) -> pd.DataFrame:
        return self.calls[self.calls["priority"] == "urgent"]

    @property
    def with_errors(self) -> int:
        return int(self.calls["errors"].notna().sum())

    @property
    def needs_review(self) -> pd.DataFrame:
        """Calls with a review reason, most serious first: possible under-triage, then urgent, then the rest."""
        flagged = self.calls[self.calls["review"].notna()]
        rank = flagged["review"].str.contains(UNDER_TRIAGE_REASON, regex=False).map({True: 0, False: 2})
        rank = rank.where(~((rank == 2) & (flagged["priority"] == "urgent")), 1)
        return flagged.assign(_rank=rank).sort_values(["_rank", "call_id"]).drop(columns="_rank")


def build_report(source: str | Path, now: datetime | None = None) -> Report:
    """Read the dataset and its manifest into a Report. Raises InputError when it is not a dataset."""
    source = Path(source)
    calls, priorities, categories = load_calls(source)
    manifest = read_manifest(source) if source.is_dir() else None
    return Report(source, calls, priorities, categories, manifest, now or datetime.now(UTC))


def load_calls(source: Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The dataset as a DataFrame with text priority/category (None when null), plus their levels."""
    table = _read_table(source)
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise InputError(f"input {source} is not a triage dataset: no column {', '.join(missing)}")
    frame = table.to_pandas()
    priorities = _levels(frame["priority"], PRIORITIES)
    categories = _levels(frame["category"], CATEGORIES)
    for name in OUTPUT_COLUMNS:
        if name not in frame.columns:
            frame[name] = None
        elif name in ("prompt_tokens", "completion_tokens"):
            frame[name] = pd.to_numeric(frame[name], errors="coerce").fillna(0).astype("int64")
        elif name != "triaged_at":
            frame[name] = _as_text(frame[name])
    return frame, priorities, categories


def _read_table(source: Path) -> pa.Table:
    if not source.exists():
        raise InputError(f"input {source} does not exist (run `make triage` first, or pass --input)")
    try:
        dataset = pads.dataset(source, format="parquet")
        if dataset.files:
            return dataset.to_table()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"input {source} is not a readable Parquet dataset ({first_line(exc)})") from None
    if not (source / MANIFEST_NAME).is_file():
        raise InputError(f"input {source} holds no Parquet files: not a triage dataset")
    return OUTPUT_SCHEMA.empty_table()  # a run with no rows: its manifest, no part files


def _levels(column: pd.Series, known: Iterable[str]) -> list[str]:
    """The known levels in their order, then any other value seen (or declared by a categorical)."""
    levels = list(known)
    declared = list(column.cat.categories) if isinstance(column.dtype, pd.CategoricalDtype) else []
    seen = sorted({str(v) for v in column.dropna().unique()})
    for value in [str(v) for v in declared] + seen:
        if value not in levels:
            levels.append(value)
    return levels


def _as_text(column: pd.Series) -> pd.Series:
    """Strings, with None for nulls, whatever the column's dtype (string, categorical, object)."""
    values = column.astype(object)
    return values.where(column.notna(), None).map(lambda v: v if v is None else str(v))


def read_manifest(folder: Path) -> Manifest | None:
    """The run's manifest beside the dataset, or None when there is none; never raises on its content."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = Manifest(path=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        manifest.problem = redact(first_line(exc))
        return manifest
    for key, value in flatten(data if isinstance(data, dict) else {"manifest": data}):
        if not key:  # an empty manifest: nothing to show
            continue
        safe = MASK if _is_secret(key, value) else value
        manifest.values[key] = safe
        manifest.rows.append((redact(key), redact(_text(safe))))
    return manifest


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested dicts and lists as (dotted.key, scalar) pairs; a list of scalars stays one value."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        for index, item in enumerate(value):
            yield from flatten(item, f"{prefix}[{index}]")
    else:
        yield prefix, value


def _is_secret(key: str, value: Any) -> bool:
    return isinstance(value, str) and bool(value) and bool(_SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return ", ".join(_text(item) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
