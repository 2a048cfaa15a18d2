"""The command line: one-line errors with exit 2, and a real run with the key only in .env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.fake_provider import FakeProvider, expected_answer

ROOT = Path(__file__).resolve().parents[1]


def triage_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRIAGE_", "RAY_ADDRESS")) and k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
    }
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "triage", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--input", "nowhere.jsonl"], "error: input nowhere.jsonl does not exist"),
        (["run", "--input", "calls.xlsx"], "error: input calls.xlsx: unsupported format '.xlsx'"),
        (["run", "--input", "calls.csv"], "error: input calls.csv: no 'transcript' column"),
        (["run", "--concurrency", "0"], "error: --concurrency / TRIAGE_CONCURRENCY must be at least 1"),
        (["run", "--model", "gpt4"], "error: --model / TRIAGE_MODEL must be a DSPy model string"),
        (["run", "--model", "openai/gpt-4.1-mini"], "error: no API key for openai/gpt-4.1-mini: set TRIAGE_API_KEY"),
    ],
)
def test_a_run_that_cannot_start_exits_2_with_one_line(tmp_path, args, message):
    (tmp_path / "calls.xlsx").write_text("x")
    (tmp_path / "calls.csv").write_text("id,text\n1,hello\n")
    result = triage_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_bad_flag_is_an_error():
    result = triage_cli("run", "--concurrency", "lots", cwd=ROOT)
    assert result.returncode == 2 and "invalid int value" in result.stderr


@pytest.mark.slow
def test_run_with_key_only_in_dotenv_writes_dataset_and_leaks_no_secret(tmp_path):
    key = "sk-dotenv-only-5b8c1e9d"
    transcripts = [f"caller {i} reports smoke on floor {i}" for i in range(8)]
    (tmp_path / "calls.jsonl").write_text("".join(json.dumps({"transcript": t}) + "\n" for t in transcripts))
    with FakeProvider(api_key=key, rate_429=0.1, retry_after=0.05) as provider:
        (tmp_path / ".env").write_text(f"TRIAGE_API_KEY={key}\nTRIAGE_API_BASE={provider.url}\n")
        result = triage_cli("run", "--input", "calls.jsonl", "--output", "out", "--model", "openai/fake", cwd=tmp_path)
        assert provider.stats()["outcomes"]["401"] == 0
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip()
        .splitlines()[-1]
        .startswith("8 rows in, 0 skipped as already done, 8 triaged, 8 rows out, 0 with errors")
    )
    frame = pd.read_parquet(tmp_path / "out")
    assert sorted(frame["call_id"]) == sorted(f"calls.jsonl:{i}" for i in range(1, 9))
    for row in frame.itertuples():
        assert row.priority == expected_answer(row.transcript)["priority"]
    for text in (result.stdout, result.stderr, frame.to_csv()):
        assert key not in text
    session_logs = Path("/tmp/ray/session_latest/logs")
    leaked = [p for p in session_logs.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert leaked == []
