"""The supervisor's report: numbers, escaping and the manifest in the HTML, then the page in real Chromium."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import browser
from triage.cli import main
from triage.errors import InputError
from triage.report import error_kind, error_parts, write_report
from triage.schema import OUTPUT_SCHEMA

ATTACK = "<script>alert(1)</script>"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SECRET = "sk-proj-abcdefghijklmnop1234"


def _row(call_id: str, priority: str | None, category: str | None, **values: Any) -> dict[str, Any]:
    ok = priority is not None
    row = {
        "call_id": call_id,
        "transcript": f"caller reports {call_id}",
        "priority": priority,
        "category": category,
        "summary": f"summary of {call_id}" if ok else None,
        "location": "12 Elm St" if ok else None,
        "subject_description": "" if ok else None,
        "errors": None,
        "model": "openai/gpt-4.1-mini",
        "prompt_tokens": 100 if ok else 0,
        "completion_tokens": 20 if ok else 0,
        "triaged_at": NOW - timedelta(minutes=len(call_id)),
    }
    return row | values


ROWS = [
    _row("c-fire-1", "urgent", "fire", location="3 Oak Ave, apt 4"),
    _row("c-fire-2", "urgent", "fire", summary=f"Kitchen fire {ATTACK}", transcript=f"help {ATTACK} & fire"),
    _row("c-med-1", "urgent", "medical", location=""),
    _row("c-med-2", "non_urgent", "medical", location=None, errors="extract_details: TimeoutError: timed out"),
    _row("c-noise-1", "non_urgent", "noise"),
    _row("c-noise-2", "not_an_emergency", "noise"),
    _row("c-animal-1", "non_urgent", "animal", model=None),
    _row("bad-1", None, None, transcript=None, errors="input: line 7: invalid JSON (Expecting value)"),
    _row("bad-2", None, None, transcript=None, errors="input: empty transcript"),
    _row(
        "bad-3",
        None,
        None,
        prompt_tokens=300,
        completion_tokens=90,
        errors="triage: InvalidAnswer: no valid answer after 3 attempts: `priority` is missing; `summary` is empty; "
        "extract_details: InvalidAnswer: no valid answer after 3 attempts: `location` is missing",
    ),
]
MANIFEST = {
    "input": "data/calls.jsonl",
    "rows": {"in": 10, "out": 10, "with_errors": 4},
    "model": "openai/gpt-4.1-mini",
    "estimated_cost_usd": 0.01234,
    "settings": {"api_key": SECRET, "concurrency": 16, "note": f"Bearer {SECRET}"},
    "packages": {"dspy": "3.4.1", "ray": "2.60.0"},
    "programs": [{"file": "optimized/triager.json", "sha256": "ab12"}],
    "comment": ATTACK,
}


def write_dataset(folder: Path, rows: list[dict[str, Any]], *, manifest: dict[str, Any] | None = None) -> Path:
    """A dataset in two part files, as the pipeline writes it, with an optional manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    for index, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=OUTPUT_SCHEMA), folder / f"part-{index}.parquet")
    if manifest is not None:
        (folder / "_manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def render(tmp_path: Path, rows: list[dict[str, Any]] = ROWS, **kwargs: Any) -> str:
    source = write_dataset(tmp_path / "triaged_calls", rows, **kwargs)
    write_report(source, tmp_path / "report.html", now=NOW)
    return (tmp_path / "report.html").read_text(encoding="utf-8")


VOID = {"meta", "link", "br", "img", "input", "hr", "col", "source", "wbr", "area", "base", "embed"}


class _Cells(HTMLParser):
    """The text of every element carrying data-* attributes, keyed by those attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, ...], str] = {}
        self._open: list[tuple[tuple[str, ...], list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID:
            self._open.append((tuple(f"{k}={v}" for k, v in attrs if k.startswith("data-")), []))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        pass

    def handle_data(self, data: str) -> None:
        for _, texts in self._open:
            if data.strip():
                texts.append(data.strip())

    def handle_endtag(self, tag: str) -> None:
        if tag not in VOID and self._open:
            key, texts = self._open.pop()
            if key:
                self.cells[key] = " ".join(texts)


def cells(page: str) -> dict[tuple[str, ...], str]:
    parser = _Cells()
    parser.feed(page)
    return parser.cells


def cell(page: str, priority: str, category: str) -> str:
    return cells(page)[(f"data-priority={priority}", f"data-category={category}")]


def stat(page: str, name: str) -> str:
    """A headline tile's text: "value label note"."""
    return cells(page)[(f"data-stat={name}",)]


# --- content -------------------------------------------------------------------------------


def test_headline_numbers(tmp_path):
    page = render(tmp_path, manifest=MANIFEST)
    assert stat(page, "calls").startswith("10 calls")
    assert stat(page, "urgent").startswith("3 urgent")
    assert stat(page, "errors").startswith("4 with errors")
    assert stat(page, "prompt_tokens") == "1,000 tokens in"
    assert stat(page, "completion_tokens") == "230 tokens out"
    assert stat(page, "cost").startswith("$0.0123 estimated cost")


def test_priority_by_category_cells(tmp_path):
    page = render(tmp_path)
    expected = {
        ("urgent", "fire"): "2",
        ("urgent", "medical"): "1",
        ("urgent", "crime"): "0",
        ("non_urgent", "medical"): "1",
        ("non_urgent", "noise"): "1",
        ("non_urgent", "animal"): "1",
        ("not_an_emergency", "noise"): "1",
        ("not triaged", "not triaged"): "3",
        ("urgent", "all"): "3",
        ("non_urgent", "all"): "3",
        ("all", "noise"): "2",
        ("all", "all"): "10",
    }
    assert {key: cell(page, *key) for key in expected} == expected


def test_urgent_calls_listed_with_summary_and_location(tmp_path):
    page = render(tmp_path)
    rows = {key[0]: text for key, text in cells(page).items() if key[0].startswith("data-call-id=")}
    assert sorted(rows) == ["data-call-id=c-fire-1", "data-call-id=c-fire-2", "data-call-id=c-med-1"]
    assert "summary of c-fire-1" in rows["data-call-id=c-fire-1"]
    assert "3 Oak Ave, apt 4" in rows["data-call-id=c-fire-1"]
    assert "(none given)" in rows["data-call-id=c-med-1"]
    assert "c-noise-1" not in rows


def test_calls_needing_review_come_under_triage_first_then_urgent(tmp_path):
    rows = [
        *ROWS,
        _row("r-calm", "non_urgent", "noise", review="location not in the transcript: '1 Canal St'"),
        _row("r-urgent", "urgent", "fire", review="answered on attempt 2 (earlier answers did not validate)"),
        _row(
            "r-under",
            "non_urgent",
            "medical",
            review=f"possible under-triage: similar labelled calls say urgent (61%), answer non_urgent; {ATTACK}",
        ),
    ]
    page = render(tmp_path, rows, manifest=MANIFEST)
    assert stat(page, "review").startswith("3 need review 23.1%")
    listed = re.findall(r'<tr data-review-id="([^"]+)"', page)
    assert listed == ["r-under", "r-urgent", "r-calm"]
    texts = {key[0]: text for key, text in cells(page).items() if key[0].startswith("data-review-id=")}
    assert "possible under-triage: similar labelled calls say urgent (61%)" in texts["data-review-id=r-under"]
    assert "&lt;script&gt;" in page and "<script" not in page.lower()
    assert "Needs review (3)" in page
    assert "No call needs review." in render(tmp_path / "calm", ROWS)


def test_untrusted_text_is_escaped(tmp_path):
    page = render(tmp_path, manifest=MANIFEST)
    assert "<script" not in page.lower()
    assert "Kitchen fire &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "help &lt;script&gt;alert(1)&lt;/script&gt; &amp; fire" in page  # the transcript, under <details>


def test_page_forbids_scripts_and_requests(tmp_path):
    page = render(tmp_path)
    assert "default-src 'none'" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "@import" not in page and "url(" not in page


def test_error_counts_by_stage_and_kind(tmp_path):
    page = render(tmp_path)
    kinds = {
        key[0].removeprefix("data-kind="): text for key, text in cells(page).items() if key[0].startswith("data-kind")
    }
    counts = {kind: re.search(r"\d+", text.removeprefix(kind)).group() for kind, text in kinds.items()}
    assert counts == {
        "extract_details: InvalidAnswer": "1",
        "extract_details: TimeoutError": "1",
        "input: empty transcript": "1",
        "input: invalid JSON": "1",
        "triage: InvalidAnswer": "1",
    }


@pytest.mark.parametrize(
    ("errors", "parts"),
    [
        ("input: empty transcript", ["input: empty transcript"]),
        (
            "triage: InvalidAnswer: x; `summary` is empty; extract_details: E: y",
            ["triage: InvalidAnswer: x; `summary` is empty", "extract_details: E: y"],
        ),
    ],
)
def test_error_parts_split_on_stages_only(errors, parts):
    assert error_parts(errors) == parts


@pytest.mark.parametrize(
    ("part", "kind"),
    [
        ("input: line 12: invalid JSON (Expecting ',' delimiter)", "input: invalid JSON"),
        ("input: transcript is not text (int)", "input: transcript is not text"),
        ("input: line 3: not valid UTF-8", "input: not valid UTF-8"),
        ("triage: RateLimitError: litellm.RateLimitError: 429", "triage: RateLimitError"),
        ("extract_details: InvalidAnswer: no valid answer after 3 attempts", "extract_details: InvalidAnswer"),
    ],
)
def test_error_kind(part, kind):
    assert error_kind(part) == kind


def test_tokens_by_model(tmp_path):
    page = render(tmp_path)
    models = {k[0]: t for k, t in cells(page).items() if k[0].startswith("data-model=")}
    assert models["data-model=openai/gpt-4.1-mini"].split() == ["openai/gpt-4.1-mini", "9", "900", "210", "123"]
    assert models["data-model=(unknown)"].split() == ["(unknown)", "1", "100", "20", "120"]


def test_manifest_rendered_without_secrets(tmp_path):
    page = render(tmp_path, manifest=MANIFEST)
    assert 'id="manifest"' in page
    assert SECRET not in page and "abcdefghijklmnop" not in page
    for key, value in [("rows.with_errors", "4"), ("packages.dspy", "3.4.1"), ("programs[0].sha256", "ab12")]:
        assert f'<th scope="row">{key}</th><td>{value}</td>' in page
    assert '<th scope="row">settings.api_key</th><td>****</td>' in page


def test_empty_manifest_and_secret_named_keys(tmp_path):
    page = render(tmp_path, manifest={})
    assert '<table class="manifest" id="manifest"><tbody></tbody></table>' in page
    secrets = {"hf_token": "hf_abcdefghijklmnopqrstuvwxyz", "db": {"password": "hunter2-hunter2"}, "tokens": 5}
    page = render(tmp_path / "again", manifest=secrets)
    assert "hf_abcdefghij" not in page and "hunter2" not in page
    assert '<th scope="row">tokens</th><td>5</td>' in page


def test_missing_and_unreadable_manifest_are_said(tmp_path):
    assert 'id="no-manifest"' in render(tmp_path)
    (tmp_path / "triaged_calls" / "_manifest.json").write_text("{not json", encoding="utf-8")
    write_report(tmp_path / "triaged_calls", tmp_path / "again.html", now=NOW)
    again = (tmp_path / "again.html").read_text(encoding="utf-8")
    assert 'id="bad-manifest"' in again
    assert stat(again, "cost").startswith("n/a")


def test_categorical_columns(tmp_path):
    table = pa.Table.from_pylist(ROWS, schema=OUTPUT_SCHEMA)
    for name in ("priority", "category"):
        table = table.set_column(table.schema.get_field_index(name), name, table[name].dictionary_encode())
    folder = tmp_path / "categorical"
    folder.mkdir()
    pq.write_table(table, folder / "part-0.parquet")
    write_report(folder, tmp_path / "report.html", now=NOW)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert cell(page, "urgent", "fire") == "2"
    assert cell(page, "all", "all") == "10"


def test_all_error_dataset(tmp_path):
    page = render(tmp_path, rows=ROWS[-3:])
    assert stat(page, "urgent").startswith("0 urgent")
    assert stat(page, "errors").startswith("3 with errors")
    assert cell(page, "not triaged", "not triaged") == "3"
    assert "No urgent calls." in page


def test_empty_dataset(tmp_path):
    page = render(tmp_path, rows=[])
    assert stat(page, "calls").startswith("0 calls")
    assert cell(page, "all", "all") == "0"
    assert "No urgent calls." in page and "No errors." in page


def test_run_with_only_a_manifest_is_an_empty_report(tmp_path):
    folder = tmp_path / "empty_run"
    folder.mkdir()
    (folder / "_manifest.json").write_text(json.dumps({"rows": {"in": 0}}), encoding="utf-8")
    assert (
        write_report(folder, tmp_path / "r.html").line() == f"0 calls, 0 urgent, 0 with errors -> {tmp_path / 'r.html'}"
    )


@pytest.mark.parametrize("kind", ["missing", "empty folder", "not parquet"])
def test_not_a_dataset(tmp_path, kind):
    folder = tmp_path / "in"
    if kind != "missing":
        folder.mkdir()
    if kind == "not parquet":
        (folder / "calls.jsonl").write_text('{"transcript": "hi"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"^input .*(does not exist|no Parquet files|not a readable Parquet)"):
        write_report(folder, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_summary_line(tmp_path):
    source = write_dataset(tmp_path / "d", ROWS)
    summary = write_report(source, tmp_path / "sub" / "report.html")
    assert summary.line() == f"10 calls, 3 urgent, 4 with errors -> {tmp_path / 'sub' / 'report.html'}"


# --- a real browser ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed by `make setup`; without it the browser test is skipped, saying so."""
    try:
        return browser.require_chromium()
    except browser.BrowserError as exc:
        pytest.skip(f"no headless Chromium: {exc}")


@pytest.mark.slow
def test_page_in_headless_chromium(tmp_path, chromium):
    source = write_dataset(tmp_path / "triaged_calls", ROWS, manifest=MANIFEST)
    output = write_report(source, tmp_path / "report.html", now=NOW).output
    page = browser.open_page(output.resolve().as_uri(), timeout=60)
    browser.save_screenshot(page, tmp_path / "report.png")  # kept by pytest under its basetemp

    assert page.console_errors == []
    assert page.remote_requests() == []
    dom = page.dom
    assert stat(dom, "calls").startswith("10 calls")
    assert stat(dom, "urgent").startswith("3 urgent")
    assert stat(dom, "errors").startswith("4 with errors")
    assert cell(dom, "urgent", "fire") == "2"
    assert cell(dom, "all", "all") == "10"
    assert 'data-call-id="c-fire-2"' in dom
    assert "Kitchen fire &lt;script&gt;alert(1)&lt;/script&gt;" in dom  # shown as text, never run
    assert "<script" not in dom.lower()
    assert SECRET not in dom
    assert page.screenshot.startswith(b"\x89PNG")


# --- the command ---------------------------------------------------------------------------


def test_cli_report(tmp_path, capsys):
    source = write_dataset(tmp_path / "triaged_calls", ROWS, manifest=MANIFEST)
    output = tmp_path / "out" / "report.html"
    assert main(["report", "--input", str(source), "--output", str(output)]) == 0
    assert capsys.readouterr().out == f"10 calls, 3 urgent, 4 with errors -> {output}\n"
    assert output.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_cli_report_without_a_dataset(tmp_path, capsys):
    assert main(["report", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "r.html")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err
        == f"error: input {tmp_path / 'nothing'} does not exist (run `make triage` first, or pass --input)\n"
    )
