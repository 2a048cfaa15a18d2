"""The HTML page: one self-contained string rendered from a `Report`, and writing it.

Self-contained: CSS and charts are inline, and a Content-Security-Policy forbids every script
and every request, so the page works offline and an escaping slip could not run code. Every
value from the data (transcripts, summaries, ids, manifest text) is untrusted and goes through
`esc` (`html.escape`, quotes included).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from triage.atomic import atomic_write_text
from triage.errors import TriageError
from triage.manifest import MANIFEST_NAME
from triage.report.aggregation import (
    NOT_TRIAGED,
    cost_display,
    error_kinds,
    priority_by_category,
    tokens_by_model,
)
from triage.report.data import Report, build_report

MAX_URGENT_ROWS = 500
MAX_REVIEW_ROWS = 500
MAX_TRANSCRIPT_CHARS = 4000
PRIORITY_COLOURS = {
    "urgent": "#c62828",
    "non_urgent": "#ef8f00",
    "not_an_emergency": "#4f7cac",
    NOT_TRIAGED: "#b0b0b0",
}
OTHER_COLOUR = "#7e57c2"


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
    cost, cost_note = cost_display(report.manifest)
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
    cost, note = cost_display(report.manifest)
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


@dataclass(frozen=True)
class ReportSummary:
    """The one line the CLI prints."""

    calls: int
    urgent: int
    with_errors: int
    output: Path

    def line(self) -> str:
        return f"{self.calls} calls, {self.urgent} urgent, {self.with_errors} with errors -> {self.output}"


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
