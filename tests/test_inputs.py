"""Input reading: formats, deterministic ids, per-row problems, one-line file errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from triage.errors import InputError
from triage.inputs import check_input_file, read_rows, resolve_input_files, scan_inputs


def rows_of(path: Path) -> list[dict]:
    return list(read_rows(path))


def test_jsonl_keeps_given_ids_and_numbers_the_rest(tmp_path):
    path = tmp_path / "calls.jsonl"
    path.write_text(
        json.dumps({"call_id": "A-1", "transcript": "fire"}) + "\n\n" + json.dumps({"transcript": "help"}) + "\n"
    )
    rows = rows_of(path)
    assert [r["call_id"] for r in rows] == ["A-1", "calls.jsonl:3"]  # its line: the blank line 2 is counted
    assert [r["transcript"] for r in rows] == ["fire", "help"]
    assert rows_of(path) == rows  # a rerun gives the same ids


def test_jsonl_bad_lines_become_row_errors_and_the_rest_is_kept(tmp_path):
    path = tmp_path / "calls.jsonl"
    path.write_bytes(
        b'{"transcript": "one"}\n{not json\n"just a string"\n{"transcript": "caf\xe9 \xff"}\n'
        b'{"transcript": "  "}\n{"transcript": 42}\n{"transcript": null}\n{"transcript": "last"}\n'
    )
    rows = rows_of(path)
    assert len(rows) == 8
    problems = [r["input_error"] for r in rows]
    assert problems[0] is None and problems[-1] is None
    assert problems[1].startswith("line 2: invalid JSON")
    assert problems[2] == "line 3: expected a JSON object, got str"
    assert problems[3] == "line 4: not valid UTF-8"
    assert problems[4] == "empty transcript"
    assert problems[5] == "transcript is not text (int)"
    assert problems[6] == "missing transcript"
    assert all(r["transcript"] is None for r, p in zip(rows, problems, strict=True) if p)  # nothing to triage
    assert rows[-1]["transcript"] == "last"


def test_csv_parquet_and_text(tmp_path):
    csv_path = tmp_path / "a.csv"
    pd.DataFrame({"call_id": ["x", None], "transcript": ["smoke, lots of it", "dog barking\nall night"]}).to_csv(
        csv_path, index=False
    )
    assert [(r["call_id"], r["transcript"]) for r in rows_of(csv_path)] == [
        ("x", "smoke, lots of it"),
        ("a.csv:2", "dog barking\nall night"),
    ]

    parquet_path = tmp_path / "b.parquet"
    pd.DataFrame({"transcript": ["one", "two"], "other": [1, 2]}).to_parquet(parquet_path)
    assert [(r["call_id"], r["transcript"]) for r in rows_of(parquet_path)] == [
        ("b.parquet:1", "one"),
        ("b.parquet:2", "two"),
    ]
    text_path = tmp_path / "c.txt"
    text_path.write_text("first call\n\nsecond call\n")
    assert [(r["call_id"], r["transcript"]) for r in rows_of(text_path)] == [
        ("c.txt:1", "first call"),
        ("c.txt:3", "second call"),
    ]
    assert scan_inputs([csv_path, parquet_path, text_path]).rows == 6


def test_a_rows_id_and_its_error_message_cite_the_same_line(tmp_path):
    jsonl = tmp_path / "calls.jsonl"
    lines = [
        b'{"transcript": "one"}',
        b"",
        b"{not json",
        b"  ",
        b'"text"',
        b'{"transcript": "\xff"}',
        b"",
        b'{"call_id": "X"}',
    ]
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    rows = rows_of(jsonl)
    assert [(r["call_id"], r["input_error"]) for r in rows] == [
        ("calls.jsonl:1", None),
        ("calls.jsonl:3", "line 3: invalid JSON (Expecting property name enclosed in double quotes)"),
        ("calls.jsonl:5", "line 5: expected a JSON object, got str"),
        ("calls.jsonl:6", "line 6: not valid UTF-8"),
        ("X", "missing transcript"),
    ]
    text = tmp_path / "calls.txt"
    text.write_bytes(b"first\n\n\xff second\n")
    assert [(r["call_id"], r["input_error"]) for r in rows_of(text)] == [
        ("calls.txt:1", None),
        ("calls.txt:3", "line 3: not valid UTF-8"),
    ]
    # A duplicated call_id is made unique with the same number.
    other = tmp_path / "other.jsonl"
    other.write_text('\n{"call_id": "X", "transcript": "again"}\n')
    scan = scan_inputs([jsonl, other])
    assert scan.call_ids == [
        "calls.jsonl:1",
        "calls.jsonl:3",
        "calls.jsonl:5",
        "calls.jsonl:6",
        "X@calls.jsonl:8",
        "X@other.jsonl:2",
    ]
    assert [r["call_id"] for f in (jsonl, other) for r in read_rows(f, scan.duplicates)] == scan.call_ids


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("calls.csv", 'call_id,transcript\r\n,smoke in the hall\r\nB-2,"dog, barking"\r\n'),  # as Excel writes it
        ("calls.jsonl", '{"transcript": "smoke in the hall"}\n{"call_id": "B-2", "transcript": "dog, barking"}\n'),
        ("calls.txt", "smoke in the hall\ndog, barking\n"),
    ],
    ids=["csv", "jsonl", "text"],
)
def test_a_byte_order_mark_reads_like_a_plain_file(tmp_path, name, content):
    plain, marked = tmp_path / "plain" / name, tmp_path / "marked" / name
    for path, encoding in ((plain, "utf-8"), (marked, "utf-8-sig")):
        path.parent.mkdir()
        path.write_bytes(content.encode(encoding))
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    check_input_file(marked)  # the header has its `transcript` column
    rows = rows_of(marked)
    assert rows == rows_of(plain)
    assert rows[0] == {"call_id": f"{name}:1", "transcript": "smoke in the hall", "input_error": None}
    assert scan_inputs([marked]).call_ids == scan_inputs([plain]).call_ids


def test_a_byte_order_mark_does_not_hide_a_missing_transcript_field(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes('{"text": "hello"}\n'.encode("utf-8-sig"))
    with pytest.raises(InputError, match="first record has no 'transcript' field"):
        check_input_file(jsonl)


def test_folder_and_glob(tmp_path):
    (tmp_path / "b.txt").write_text("x\n")
    (tmp_path / "a.jsonl").write_text('{"transcript": "y"}\n')
    (tmp_path / "notes.md").write_text("ignored")
    assert [p.name for p in resolve_input_files(str(tmp_path))] == ["a.jsonl", "b.txt"]
    assert [p.name for p in resolve_input_files(str(tmp_path / "*.txt"))] == ["b.txt"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: str(d / "missing.jsonl"), "does not exist"),
        (lambda d: (d / "x.xlsx").write_text("x") and str(d / "x.xlsx"), "unsupported format '.xlsx'"),
        (lambda d: str(d / "*.csv"), "matches no files"),
    ],
)
def test_unreadable_inputs_are_one_line_errors(tmp_path, setup, message):
    with pytest.raises(InputError, match=message) as info:
        resolve_input_files(setup(tmp_path))
    assert "\n" not in str(info.value)


def test_missing_transcript_column_is_a_file_error(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("id,text\n1,hello\n")
    with pytest.raises(InputError, match="no 'transcript' column"):
        check_input_file(csv_path)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "hello"}\n')
    with pytest.raises(InputError, match="no 'transcript' field"):
        check_input_file(jsonl)
    parquet = tmp_path / "a.parquet"
    pd.DataFrame({"text": ["x"]}).to_parquet(parquet)
    with pytest.raises(InputError, match="no 'transcript' column"):
        check_input_file(parquet)


def test_duplicate_ids_are_made_unique_on_every_occurrence(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text('{"call_id": "X", "transcript": "one"}\n{"call_id": "Y", "transcript": "two"}\n')
    second.write_text('{"call_id": "X", "transcript": "three"}\n{"transcript": "four"}\n')
    scan = scan_inputs([first, second])
    assert scan.duplicates == {"X"}
    assert scan.call_ids == ["X@a.jsonl:1", "Y", "X@b.jsonl:1", "b.jsonl:2"]
    assert [r["call_id"] for f in (first, second) for r in read_rows(f, scan.duplicates)] == scan.call_ids
    assert scan_inputs([first, second], limit=2).call_ids == ["X@a.jsonl:1", "Y"]


def test_overlong_transcripts_are_cut_with_a_note_and_done_rows_are_left_out(tmp_path):
    from triage.source import prepared_rows

    path = tmp_path / "calls.jsonl"
    path.write_text('{"call_id": "long", "transcript": "' + "x" * 50 + '"}\n{"call_id": "done", "transcript": "y"}\n')
    rows = list(prepared_rows(path, model="m", duplicates=frozenset(), to_do=frozenset({"long"}), max_chars=20))
    assert [r["call_id"] for r in rows] == ["long"]
    assert rows[0]["transcript"] == "x" * 20
    assert rows[0]["review"] == "transcript cut to 20 of 50 characters: the answers saw only the start"
    assert rows[0]["errors"] is None  # the row is answered: a reason to review it, not an error
