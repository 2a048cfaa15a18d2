"""The numbers the page shows: calls by priority x category, errors by kind, tokens by model, the cost.

Plain pandas over a `Report`; no HTML here.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from triage.errors import redact
from triage.report.data import Manifest, Report

STAGES = ("input", "triage", "extract_details")
NOT_TRIAGED = "not triaged"
MAX_KIND_CHARS = 80

_ERROR_SPLIT = re.compile(rf"; (?=(?:{'|'.join(STAGES)}): )")
_LINE_PREFIX = re.compile(r"^line \d+: ")
_EXCEPTION_NAME = re.compile(r"^([A-Z][A-Za-z0-9_.]*): ")  # the stages write "ExceptionName: message"
_TRAILING_DETAIL = re.compile(r"\s*\(.*\)\s*$")


@dataclass(frozen=True)
class ErrorKind:
    """Rows whose errors include one kind of failure, e.g. "triage: InvalidAnswer"."""

    kind: str
    rows: int
    example: str


def priority_by_category(report: Report) -> pd.DataFrame:
    """Calls per (priority, category), every level present, nulls as "not triaged"; rows are priorities."""
    calls = report.calls
    rows = [*report.priorities, NOT_TRIAGED]
    columns = [*report.categories, NOT_TRIAGED]
    if calls.empty:
        return pd.DataFrame(0, index=rows, columns=columns)
    counts = pd.crosstab(calls["priority"].fillna(NOT_TRIAGED), calls["category"].fillna(NOT_TRIAGED))
    return counts.reindex(index=rows, columns=columns, fill_value=0).astype(int)


def error_parts(errors: str) -> list[str]:
    """One row's `errors` split into its "stage: reason" parts (a reason may itself hold "; ")."""
    return [part for part in _ERROR_SPLIT.split(errors) if part.strip()]


def error_kind(part: str) -> str:
    """The kind of one "stage: reason": the exception name, or the reason without line numbers and details."""
    stage, _, reason = part.partition(": ")
    if not reason:
        return _shorten(part.strip())
    reason = _LINE_PREFIX.sub("", reason.strip())
    named = _EXCEPTION_NAME.match(reason)
    kind = named.group(1) if named else _TRAILING_DETAIL.sub("", reason)
    return f"{stage}: {_shorten(kind or reason)}"


def error_kinds(errors: pd.Series) -> list[ErrorKind]:
    """Rows per error kind (a row counts once per kind), most frequent first, with one example each."""
    rows: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for text in errors.dropna():
        kinds: dict[str, str] = {}
        for part in error_parts(redact(str(text))):
            kinds.setdefault(error_kind(part), part)
        rows.update(kinds.keys())
        for kind, part in kinds.items():
            examples.setdefault(kind, part)
    return [ErrorKind(kind, count, examples[kind]) for kind, count in sorted(rows.items(), key=lambda i: (-i[1], i[0]))]


def tokens_by_model(calls: pd.DataFrame) -> pd.DataFrame:
    """Calls and tokens per model string."""
    frame = calls.assign(model=calls["model"].fillna("(unknown)"))
    grouped = frame.groupby("model", sort=True).agg(
        calls=("call_id", "size"),
        prompt_tokens=("prompt_tokens", "sum"),
        completion_tokens=("completion_tokens", "sum"),
    )
    return grouped.sort_values("calls", ascending=False)


def cost_display(manifest: Manifest | None) -> tuple[str, str]:
    """The cost headline and how it was found, from the manifest's first numeric key naming a cost."""
    if manifest is None:
        return "n/a", "no manifest"
    keys = [k for k in manifest.values if "cost" in k.lower()]
    keys.sort(key=lambda k: ("total" not in k.lower() and "estimat" not in k.lower(), len(k)))
    for key in keys:
        value = manifest.values[key]
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            money = f"${value:,.4f}" if "usd" in key.lower() or "dollar" in key.lower() else f"{value:,.4f}"
            return money, f"manifest: {key}"
    if keys:
        return "unknown", "the model's price is not known"
    return "n/a", "not in the manifest"


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_KIND_CHARS else text[: MAX_KIND_CHARS - 1] + "…"
