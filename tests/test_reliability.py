"""A run killed mid-way resumes without redoing finished rows; a dying worker costs only its rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.doubles import triage_run_command
from tests.fake_provider import FakeProvider, expected_answer, transcript_key
from triage.sink import completed_ids

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def start_run(folder: Path, provider: FakeProvider, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIAGE_", "RAY_ADDRESS"))}
    env.update(TRIAGE_COMMIT_SECONDS="0.5", TRIAGE_CACHE="false")
    command = triage_run_command(provider.url, "--concurrency", "4", *extra)
    # A session of its own, so the whole process group (driver and the Ray it started) can be killed.
    return subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def write_calls(folder: Path, count: int) -> list[str]:
    transcripts = [f"resumable call {i}: a car alarm and shouting on Birch Road" for i in range(count)]
    (folder / "calls.jsonl").write_text(
        "".join(json.dumps({"call_id": f"r{i:03d}", "transcript": t}) + "\n" for i, t in enumerate(transcripts))
    )
    return transcripts


@pytest.mark.parametrize("kill_group", [False, True], ids=["driver-killed", "machine-crash"])
def test_sigkill_mid_run_then_rerun_finishes_without_redoing_rows(tmp_path, kill_group):
    transcripts = write_calls(tmp_path, 120)
    with FakeProvider(latency=0.1) as provider:
        first = start_run(tmp_path, provider)
        wait_for(lambda: len(completed_ids(tmp_path / "out")) >= 20, 180, "some committed rows")
        if kill_group:
            os.killpg(first.pid, signal.SIGKILL)
        else:
            first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        done_before = completed_ids(tmp_path / "out")
        assert 20 <= len(done_before) < 120

        provider.reset_stats()
        second = start_run(tmp_path, provider)
        stdout, stderr = second.communicate(timeout=300)
        assert second.returncode == 0, stderr
        asked_again = set(provider.stats()["per_transcript"])

    assert f"120 rows in, {len(done_before)} skipped as already done, {120 - len(done_before)} triaged" in stdout
    frame = pd.read_parquet(tmp_path / "out")
    assert len(frame) == 120 and frame["call_id"].is_unique  # each row exactly once
    assert frame["errors"].isna().all()
    for row in frame.itertuples():
        assert row.priority == expected_answer(row.transcript)["priority"]
    by_id = {f"r{i:03d}": t for i, t in enumerate(transcripts)}
    # The second run sent exactly the rows the first had not committed, nothing already done.
    assert asked_again == {transcript_key(by_id[i]) for i in set(by_id) - done_before}
    if kill_group:
        os.killpg(second.pid, signal.SIGKILL) if _group_alive(second.pid) else None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _stage_worker_pids(stage: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if stage.encode() in cmdline and b"MapWorker" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_a_worker_that_dies_mid_run_costs_only_its_rows(tmp_path):
    write_calls(tmp_path, 80)
    with FakeProvider(latency=0.1) as provider:
        run = start_run(tmp_path, provider)
        wait_for(
            lambda: provider.stats()["requests"] >= 20 and _stage_worker_pids("TriageStage"),
            180,
            "the triage stage at work",
        )
        for pid in _stage_worker_pids("TriageStage"):
            os.kill(pid, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert "80 rows out, 0 with errors" in stdout
    frame = pd.read_parquet(tmp_path / "out")
    assert sorted(frame["call_id"]) == [f"r{i:03d}" for i in range(80)]
