"""The command line: one-line errors with exit 2, and a real run with the key only in .env that prints
only its progress and its summary."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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
    assert result.returncode == 2
    assert result.stderr == "error: --concurrency / TRIAGE_CONCURRENCY must be a whole number, got 'lots'\n"


@pytest.fixture
def ray_temp_dir():
    """A Ray temporary folder of the test's own (short: Ray's unix socket paths must fit in 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="ray-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--verbose"]], ids=["quiet", "verbose"])
def test_run_with_key_only_in_dotenv_writes_dataset_and_leaks_no_secret(tmp_path, ray_temp_dir, flags):
    key = "sk-dotenv-only-5b8c1e9d"
    transcripts = [f"caller {i} reports smoke on floor {i} {flags}" for i in range(8)]  # no cache hit across runs
    (tmp_path / "calls.jsonl").write_text("".join(json.dumps({"transcript": t}) + "\n" for t in transcripts))
    with FakeProvider(api_key=key, rate_429=0.1, retry_after=0.05) as provider:
        (tmp_path / ".env").write_text(f"TRIAGE_API_KEY={key}\nTRIAGE_API_BASE={provider.url}\n")
        result = triage_cli(
            "run",
            "--input",
            "calls.jsonl",
            "--output",
            "out",
            "--model",
            "openai/fake",
            *flags,
            cwd=tmp_path,
            env={"RAY_TMPDIR": str(ray_temp_dir)},
        )
        outcomes = provider.stats()["outcomes"]
    assert outcomes["401"] == 0 and outcomes["ok"] == 2 * 8  # the key was sent, for both stages of every row
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
    # What the run printed: Ray's error-level line about its map workers' constructor arguments in the
    # object store never (a false alarm, see triage.native_stderr); quiet, only the progress lines.
    assert "has constructor arguments in the object store" not in result.stderr
    if not flags:
        assert result.stdout.count("\n") == 1  # the summary
        assert result.stderr and all(
            re.fullmatch(r"triage: \d/8 rows \(\d+%\), .* with errors, .* tokens(, .* left)?", line)
            for line in result.stderr.splitlines()
        ), result.stderr
    # Ray's own files: the run's session, found where the run was told to put it, with its logs in it.
    sessions = list((ray_temp_dir / "ray").glob("session_2*"))
    assert len(sessions) == 1, sessions
    logs = sessions[0] / "logs"
    assert (logs / "raylet.out").is_file() and list(logs.glob("python-core-driver-*.log"))
    # Ray did log that line (so its absence above is the filter's doing): it stays in the driver's log.
    driver_log = "".join(p.read_text() for p in logs.glob("python-core-driver-*.log"))
    assert "'MapWorker(MapBatches(TriageStage))'" in driver_log and "constructor arguments in the object" in driver_log
    actor_logs = [p.read_text() for p in logs.glob("worker-*.out")]
    assert any(":actor_name:MapWorker(MapBatches(TriageStage))" in text for text in actor_logs)
    files = [p for p in ray_temp_dir.rglob("*") if p.is_file()]
    assert len(files) > 20
    assert [p for p in files if key.encode() in p.read_bytes()] == []
