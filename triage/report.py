"""`python -m triage report`: one self-contained HTML page about a triaged dataset, for a supervisor.

The page reads the output dataset (and its `_manifest.json`, when the run left one) and shows
the headline numbers, calls by priority x category (a heat-map table and an SVG bar chart),
the calls that need review (possible under-triage first, then urgent calls), the urgent calls,
error counts by reason, tokens and cost, and the manifest.

Self-contained: CSS and charts are inline, and a Content-Security-Policy forbids every script
and every request, so the page works offline and an escaping slip could not run code. Every
value from the data (transcripts, summaries, ids, manifest text) is untrusted and goes through
`html.escape`; manifest text also goes through `redact`, and secret-named keys are masked.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from triage.atomic import atomic_write_text
from triage.errors import InputError, TriageError, redact
from triage.manifest import MANIFEST_NAME
from triage.programs import CATEGORIES, PRIORITIES
from triage.schema import OUTPUT_COLUMNS, OUTPUT_SCHEMA

STAGES = ("input", "triage", "extract_details")
NOT_TRIAGED = "not triaged"
REQUIRED_COLUMNS = ("call_id", "priority", "category", "errors", "prompt_tokens", "completion_tokens")
MAX_URGENT_ROWS = 500
MAX_REVIEW_ROWS = 500
UNDER_TRIAGE_REASON = "possible under-triage"
MAX_TRANSCRIPT_CHARS = 4000
MAX_KIND_CHARS = 80
MASK = "****"

_ERROR_SPLIT = re.compile(rf"; (?=(?:{'|'.join(STAGES)}): )")
_LINE_PREFIX = re.compile(r"^line \d+: ")
_EXCEPTION_NAME = re.compile(r"^([A-Z][A-Za-z0-9_.]*): ")  # the stages write "ExceptionName: message"
_TRAILING_DETAIL = re.compile(r"\s*\(.*\)\s*$")
_SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|credential|authorization|(^|[_.-])token$)", re.I)
PRIORITY_COLOURS = {
    "urgent": "#c62828",
    "non_urgent": "#ef8f00",
    "not_an_emergency": "#4f7cac",
    NOT_TRIAGED: "#b0b0b0",
}
OTHER_COLOUR = "#7e57c2"


@dataclass(frozen=True)
class ErrorKind:
    """Rows whose errors include one kind of failure, e.g. "triage: InvalidAnswer"."""

    kind: str
    rows: int
    example: str


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


@dataclass(frozen=True)
class ReportSummary:
    """The one line the CLI prints."""

    calls: int
    urgent: int
    with_errors: int
    output: Path

    def line(self) -> str:
        return f"{self.calls} calls, {self.urgent} urgent, {self.with_errors} with errors -> {self.output}"


# --- reading ---------------------------------------------------------------------------------


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
        raise InputError(f"input {source} is not a readable Parquet dataset ({_first_line(exc)})") from None
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
        manifest.problem = redact(_first_line(exc))
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


def build_report(source: str | Path, now: datetime | None = None) -> Report:
    """Read the dataset and its manifest into a Report. Raises InputError when it is not a dataset."""
    source = Path(source)
    calls, priorities, categories = load_calls(source)
    manifest = read_manifest(source) if source.is_dir() else None
    return Report(source, calls, priorities, categories, manifest, now or datetime.now(UTC))


# --- numbers -------------------------------------------------------------------------------


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


def estimated_cost(manifest: Manifest | None) -> tuple[str, str]:
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- HTML ----------------------------------------------------------------------------------


def esc(value: Any) -> str:
    """Any value as escaped HTML text (quotes too, so it is safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _number(value: int | float) -> str:
    return f"{int(value):,}"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def _stat(name: str, value: str, label: str, note: str = "", tone: str = "") -> str:
    extra = f'<div class="note">{esc(note)}</div>' if note else ""
    return (
        f'<div class="stat {esc(tone)}" data-stat="{esc(name)}"><div class="value">{esc(value)}</div>'
        f'<div class="label">{esc(label)}</div>{extra}</div>'
    )


def headline(report: Report) -> str:
    calls = report.calls
    total, urgent, failed, review = len(calls), len(report.urgent), report.with_errors, len(report.needs_review)
    cost, cost_note = estimated_cost(report.manifest)
    stats = [
        _stat("calls", _number(total), "calls"),
        _stat("urgent", _number(urgent), "urgent", _percent(urgent, total), "alert" if urgent else ""),
        _stat("errors", _number(failed), "with errors", _percent(failed, total), "warn" if failed else ""),
        _stat("review", _number(review), "need review", _percent(review, total), "warn" if review else ""),
        _stat("prompt_tokens", _number(calls["prompt_tokens"].sum()), "tokens in"),
        _stat("completion_tokens", _number(calls["completion_tokens"].sum()), "tokens out"),
        _stat("cost", cost, "estimated cost", cost_note),
    ]
    return f'<section class="stats">{"".join(stats)}</section>'


def _period(calls: pd.DataFrame) -> str:
    times = pd.to_datetime(calls["triaged_at"], utc=True, errors="coerce").dropna()
    if times.empty:
        return "no calls triaged"
    first, last = times.min(), times.max()
    return f"calls triaged {first:%Y-%m-%d %H:%M} – {last:%Y-%m-%d %H:%M} UTC"


def _heat(count: int, peak: int) -> str:
    if not count or not peak:
        return ' style="color:#b5b5b5"'
    share = count / peak
    lightness = 95 - 50 * share
    ink = "#fff" if lightness < 65 else "#1b1b1b"
    return f' style="background:hsl(212 65% {lightness:.0f}%);color:{ink}"'


def heatmap_table(counts: pd.DataFrame) -> str:
    """Calls per priority (rows) x category (columns) with totals, cells shaded by count."""
    peak = int(counts.to_numpy().max()) if counts.size else 0
    head = "".join(f'<th scope="col">{esc(c)}</th>' for c in counts.columns)
    rows = []
    for priority, row in counts.iterrows():
        cells = "".join(
            f'<td class="num" data-priority="{esc(priority)}" data-category="{esc(category)}"{_heat(n, peak)}>'
            f"{_number(n)}</td>"
            for category, n in row.items()
        )
        swatch = f'<span class="swatch" style="background:{_colour(str(priority))}"></span>'
        total = f'<td class="num total" data-priority="{esc(priority)}" data-category="all">{_number(row.sum())}</td>'
        rows.append(f'<tr><th scope="row">{swatch}{esc(priority)}</th>{cells}{total}</tr>')
    totals = "".join(
        f'<td class="num total" data-priority="all" data-category="{esc(c)}">{_number(counts[c].sum())}</td>'
        for c in counts.columns
    )
    grand = f'<td class="num total" data-priority="all" data-category="all">{_number(counts.to_numpy().sum())}</td>'
    return (
        '<table class="heatmap" id="priority-by-category"><thead><tr><th scope="col">priority \\ category</th>'
        f'{head}<th scope="col">all</th></tr></thead><tbody>{"".join(rows)}</tbody>'
        f'<tfoot><tr><th scope="row">all</th>{totals}{grand}</tr></tfoot></table>'
    )


def _colour(priority: str) -> str:
    return PRIORITY_COLOURS.get(priority, OTHER_COLOUR)


def category_chart(counts: pd.DataFrame) -> str:
    """Horizontal bars, one per category, stacked by priority, as inline SVG."""
    totals = counts.sum(axis=0)
    shown = [c for c in counts.columns if totals[c]] or list(counts.columns[:-1])
    peak = max(int(totals.max()) if len(totals) else 0, 1)
    label_w, bar_w, row_h, top = 130, 480, 30, 34
    height = top + row_h * len(shown) + 8
    parts = [_legend([str(p) for p in counts.index])]
    for index, category in enumerate(shown):
        y = top + index * row_h
        parts.append(f'<text x="{label_w - 8}" y="{y + 19}" text-anchor="end" class="axis">{esc(category)}</text>')
        x = float(label_w)
        for priority in counts.index:
            n = int(counts.at[priority, category])
            if not n:
                continue
            width = bar_w * n / peak
            parts.append(
                f'<rect x="{x:.1f}" y="{y + 4}" width="{width:.1f}" height="{row_h - 8}" '
                f'fill="{_colour(str(priority))}"><title>{esc(category)}, {esc(priority)}: {n}</title></rect>'
            )
            x += width
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 19}" class="count">{_number(totals[category])}</text>')
    return (
        f'<svg class="chart" role="img" aria-label="calls by category and priority" width="{label_w + bar_w + 60}" '
        f'height="{height}" viewBox="0 0 {label_w + bar_w + 60} {height}" xmlns="http://www.w3.org/2000/svg">'
        f"{''.join(parts)}</svg>"
    )


def _legend(priorities: list[str]) -> str:
    items, x = [], 130
    for priority in priorities:
        items.append(
            f'<rect x="{x}" y="6" width="12" height="12" fill="{_colour(priority)}"/>'
            f'<text x="{x + 17}" y="16" class="legend">{esc(priority)}</text>'
        )
        x += 30 + 8 * len(priority)
    return "".join(items)


def urgent_table(report: Report, limit: int = MAX_URGENT_ROWS) -> str:
    urgent = report.urgent
    if urgent.empty:
        return '<p class="empty">No urgent calls.</p>'
    order = pd.to_datetime(urgent["triaged_at"], utc=True, errors="coerce")
    rows = urgent.assign(_order=order).sort_values(["_order", "call_id"], ascending=[False, True]).head(limit)
    body = "".join(_urgent_row(row) for row in rows.to_dict("records"))
    note = (
        f'<p class="note">Showing the {limit:,} most recent of {len(urgent):,} urgent calls.</p>'
        if len(urgent) > limit
        else ""
    )
    return (
        f'{note}<table class="calls" id="urgent-calls"><thead><tr><th>call</th><th>category</th><th>summary</th>'
        f"<th>location</th><th>subject</th><th>triaged (UTC)</th></tr></thead><tbody>{body}</tbody></table>"
    )


def _urgent_row(row: dict[str, Any]) -> str:
    details = _transcript(row)
    when = row.get("triaged_at")
    when_text = f"{when:%Y-%m-%d %H:%M}" if isinstance(when, pd.Timestamp | datetime) and not pd.isna(when) else ""
    return (
        f'<tr data-call-id="{esc(row["call_id"])}"><td class="id">{esc(row["call_id"])}</td>'
        f"<td>{_maybe(row.get('category'))}</td><td>{_maybe(row.get('summary'))}{details}</td>"
        f"<td>{_maybe(row.get('location'), empty='(none given)')}</td>"
        f'<td>{_maybe(row.get("subject_description"), empty="")}</td><td class="when">{esc(when_text)}</td></tr>'
    )


def review_table(report: Report, limit: int = MAX_REVIEW_ROWS) -> str:
    flagged = report.needs_review
    if flagged.empty:
        return '<p class="empty">No call needs review.</p>'
    body = "".join(_review_row(row) for row in flagged.head(limit).to_dict("records"))
    shown = f"the first {limit:,} of " if len(flagged) > limit else ""
    return (
        f'<p class="note">Showing {shown}{len(flagged):,} calls whose answers a second opinion or a check '
        "doubts; the answers are as the model gave them.</p>"
        '<table class="calls" id="review-calls"><thead><tr><th>call</th><th>priority</th><th>category</th>'
        f"<th>why</th><th>summary</th><th>location</th></tr></thead><tbody>{body}</tbody></table>"
    )


def _review_row(row: dict[str, Any]) -> str:
    reasons = "".join(f"<li>{esc(reason)}</li>" for reason in str(row["review"]).split("; "))
    return (
        f'<tr data-review-id="{esc(row["call_id"])}"><td class="id">{esc(row["call_id"])}</td>'
        f"<td>{_maybe(row.get('priority'))}</td><td>{_maybe(row.get('category'))}</td>"
        f'<td><ul class="reasons">{reasons}</ul></td><td>{_maybe(row.get("summary"))}{_transcript(row)}</td>'
        f"<td>{_maybe(row.get('location'), empty='(none given)')}</td></tr>"
    )


def _transcript(row: dict[str, Any]) -> str:
    transcript = row.get("transcript")
    if not transcript:
        return ""
    shown = transcript if len(transcript) <= MAX_TRANSCRIPT_CHARS else _clip(transcript)
    return f'<details><summary>transcript</summary><pre class="transcript">{esc(shown)}</pre></details>'


def _clip(text: str) -> str:
    return text[:MAX_TRANSCRIPT_CHARS] + "…"


def _maybe(value: str | None, empty: str = "") -> str:
    """A text cell: the value, a muted note when empty, a muted dash when null (its stage failed)."""
    if value is None:
        return '<span class="muted" title="not extracted: see errors">—</span>'
    if not value.strip():
        return f'<span class="muted">{esc(empty)}</span>'
    return esc(value)


def errors_table(report: Report) -> str:
    kinds = error_kinds(report.calls["errors"])
    if not kinds:
        return '<p class="empty">No errors.</p>'
    body = "".join(
        f'<tr data-kind="{esc(k.kind)}"><td>{esc(k.kind)}</td><td class="num">{_number(k.rows)}</td>'
        f'<td class="example">{esc(k.example)}</td></tr>'
        for k in kinds
    )
    return (
        f'<p class="note">{_number(report.with_errors)} calls with errors; '
        "a call with several kinds counts once in each.</p>"
        '<table class="errors" id="error-kinds"><thead><tr><th>stage: kind</th><th>calls</th>'
        f"<th>example</th></tr></thead><tbody>{body}</tbody></table>"
    )


def tokens_table(report: Report) -> str:
    calls = report.calls
    if calls.empty:
        return '<p class="empty">No calls, no tokens.</p>'
    by_model = tokens_by_model(calls)
    body = "".join(
        f'<tr data-model="{esc(model)}"><td>{esc(model)}</td><td class="num">{_number(r.calls)}</td>'
        f'<td class="num">{_number(r.prompt_tokens)}</td><td class="num">{_number(r.completion_tokens)}</td>'
        f'<td class="num">{_number((r.prompt_tokens + r.completion_tokens) / r.calls)}</td></tr>'
        for model, r in by_model.iterrows()
    )
    cost, note = estimated_cost(report.manifest)
    return (
        '<table class="tokens" id="tokens"><thead><tr><th>model</th><th>calls</th><th>tokens in</th>'
        f"<th>tokens out</th><th>tokens per call</th></tr></thead><tbody>{body}</tbody></table>"
        f'<p class="note">Estimated cost: <strong>{esc(cost)}</strong> ({esc(note)}). Tokens include retries.</p>'
    )


def manifest_table(report: Report) -> str:
    manifest = report.manifest
    if manifest is None:
        where = f"{report.source / MANIFEST_NAME}" if report.source.is_dir() else "beside a single file"
        return f'<p class="empty" id="no-manifest">No run manifest ({esc(where)} is absent).</p>'
    if manifest.problem is not None:
        return f'<p class="empty" id="bad-manifest">The manifest could not be read: {esc(manifest.problem)}</p>'
    body = "".join(f'<tr><th scope="row">{esc(k)}</th><td>{esc(v)}</td></tr>' for k, v in manifest.rows)
    return f'<table class="manifest" id="manifest"><tbody>{body}</tbody></table>'


def _section(anchor: str, title: str, content: str) -> str:
    return f'<section id="{anchor}-section"><h2>{esc(title)}</h2>{content}</section>'


def render_html(report: Report) -> str:
    """The whole page as one string: inline CSS and SVG, no script, no request."""
    counts = priority_by_category(report)
    sections = [
        headline(report),
        _section("matrix", "Calls by priority and category", heatmap_table(counts) + category_chart(counts)),
        _section("review", f"Needs review ({len(report.needs_review):,})", review_table(report)),
        _section("urgent", f"Urgent calls ({len(report.urgent):,})", urgent_table(report)),
        _section("errors", "Errors by reason", errors_table(report)),
        _section("tokens", "Tokens and cost", tokens_table(report)),
        _section("run", "Run manifest", manifest_table(report)),
    ]
    subtitle = f"{report.source} · {_period(report.calls)} · generated {report.generated_at:%Y-%m-%d %H:%M} UTC"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>911 call triage report</title><style>{CSS}</style></head><body>"
        f'<header><h1>911 call triage report</h1><p class="subtitle">{esc(subtitle)}</p></header>'
        f"<main>{''.join(sections)}</main></body></html>\n"
    )


CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

CSS = """
:root { color-scheme: light; --ink: #1b1b1b; --muted: #6b6b6b; --line: #dcdcdc; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", "Liberation Sans", sans-serif; }
header { background: #1f2a3a; color: #fff; padding: 18px 28px; }
h1 { margin: 0; font-size: 22px; }
.subtitle { margin: 4px 0 0; color: #c9d3e0; font-size: 13px; word-break: break-all; }
main { padding: 20px 28px 40px; max-width: 1400px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px; margin: 0 0 18px; }
h2 { margin: 0 0 12px; font-size: 17px; }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px;
  background: none; border: 0; padding: 0; }
.stat { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px;
  border-top: 4px solid #4f7cac; }
.stat.alert { border-top-color: #c62828; } .stat.warn { border-top-color: #ef8f00; }
.stat .value { font-size: 26px; font-weight: 700; font-variant-numeric: tabular-nums; }
.stat .label { color: var(--muted); text-transform: uppercase; letter-spacing: .04em; font-size: 12px; }
.stat .note, p.note { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; width: 100%; margin: 0 0 12px; }
th, td { border-bottom: 1px solid var(--line); padding: 6px 8px; text-align: left; vertical-align: top; }
thead th { background: #eef1f5; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; color: #3a3a3a; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.heatmap { width: auto; } .heatmap td, .heatmap th { min-width: 72px; border: 1px solid #fff; }
.heatmap td.total, .heatmap tfoot th { font-weight: 700; background: #eef1f5; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.chart { display: block; max-width: 100%; height: auto; margin-top: 8px; }
.chart .axis, .chart .legend, .chart .count { font: 12px system-ui, "DejaVu Sans", sans-serif; fill: #333; }
.calls td.id, .calls td.when { white-space: nowrap; font-variant-numeric: tabular-nums; }
.calls td { overflow-wrap: anywhere; }
ul.reasons { margin: 0; padding-left: 16px; }
details summary { cursor: pointer; color: #4f7cac; font-size: 12px; margin-top: 4px; }
pre.transcript { white-space: pre-wrap; overflow-wrap: anywhere; background: #f4f4f4; padding: 8px; border-radius: 4px;
  font: 12px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; max-height: 240px; overflow: auto; }
td.example { color: #444; font: 12px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
.manifest th, .manifest td { font: 12px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
.manifest th { width: 30%; font-weight: 600; }
.muted, .empty { color: var(--muted); }
@media print { body { background: #fff; } section, .stat { break-inside: avoid; } }
"""


# --- writing -------------------------------------------------------------------------------


def write_report(source: str | Path, output: str | Path, now: datetime | None = None) -> ReportSummary:
    """Render the report for the dataset at `source` into `output` (written whole, then moved into place)."""
    report = build_report(source, now)
    output = Path(output)
    page = render_html(report)
    try:
        atomic_write_text(output, page)
    except OSError as exc:
        raise TriageError(f"cannot write the report to {output}: {exc.strerror or exc}") from None
    return ReportSummary(len(report.calls), len(report.urgent), report.with_errors, output)
