"""A run killed mid-way resumes without redoing finished rows; a dying worker costs only its rows.

Every run is started in a session of its own, and only that session's processes are ever
signalled (`tests.processes`): never another Ray or a benchmark running beside the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.doubles import triage_run_command
from tests.fake_provider import FakeProvider, expected_answer, transcript_key
from tests.processes import send, session_processes, signal_session, stop_session, wait_gone
from triage.journal import journal_files, read_journal
from triage.pipeline import TASKS_PER_ACTOR, plan_pools, rows_per_block
from triage.settings import Settings
from triage.sink import completed_ids

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = 4  # two requests in flight per stage: one actor each


@pytest.fixture
def start_run():
    """Starts `triage run` in a session of its own, with Ray's files in a folder of its own; stops what is left."""
    started: list[subprocess.Popen] = []
    ray_temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes

    def start(
        folder: Path, provider: FakeProvider, *extra: str, env_extra: dict[str, str] | None = None
    ) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIAGE_", "RAY_ADDRESS"))}
        env.update(TRIAGE_COMMIT_SECONDS="0.5", TRIAGE_CACHE="false", RAY_TMPDIR=ray_temp)
        env.update(env_extra or {})
        command = triage_run_command(provider.url, "--concurrency", str(CONCURRENCY), *extra)
        process = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        stop_session(process.pid)
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)
    shutil.rmtree(ray_temp, ignore_errors=True)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def finished_ids(folder: Path) -> set[str]:
    """The rows a killed run finished: those in its part files and those its journal holds (a rerun commits them)."""
    journaled = (read_journal(path).column("call_id").to_pylist() for path in journal_files(folder))
    return completed_ids(folder).union(*journaled)


def write_calls(folder: Path, count: int) -> list[str]:
    transcripts = [f"resumable call {i}: a car alarm and shouting on Birch Road" for i in range(count)]
    (folder / "calls.jsonl").write_text(
        "".join(json.dumps({"call_id": f"r{i:03d}", "transcript": t}) + "\n" for i, t in enumerate(transcripts))
    )
    return transcripts


@pytest.mark.parametrize("kill_session", [False, True], ids=["driver-killed", "machine-crash"])
def test_sigkill_mid_run_then_rerun_finishes_without_redoing_rows(tmp_path, start_run, kill_session):
    transcripts = write_calls(tmp_path, 120)
    with FakeProvider(latency=0.1) as provider:
        first = start_run(tmp_path, provider)
        wait_for(lambda: len(completed_ids(tmp_path / "out")) >= 20, 180, "some committed rows")
        if kill_session:  # the driver and every process of its Ray at once, as a power cut would
            assert len(signal_session(first.pid, signal.SIGKILL)) > 3
        else:
            first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        done_before = finished_ids(tmp_path / "out")
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


def test_a_kill_between_commits_costs_seconds_of_answers_not_the_uncommitted_rows(tmp_path, start_run):
    """Issue 15: killed mid-way with nothing committed yet (30 s commits) and DSPy's cache off, then run
    again: the journal keeps what the driver had received, so both runs together send at most 1.1x the
    requests of a clean run (two per row), and every row comes out exactly once."""
    rows = 800  # what a kill costs is a few seconds of answers, whatever the run's size: here about 5%
    transcripts = write_calls(tmp_path, rows)
    with FakeProvider(latency=0.05) as provider:
        first = start_run(tmp_path, provider, env_extra={"TRIAGE_COMMIT_SECONDS": "30"})
        wait_for(lambda: provider.stats()["requests"] >= rows, 180, "half the requests")
        assert len(signal_session(first.pid, signal.SIGKILL)) > 3  # the run and its Ray, by pid
        first.wait(timeout=30)
        assert wait_gone(set(session_processes(first.pid)), 30)
        assert not list((tmp_path / "out").glob("part-*")), "a part was committed before the kill: no test"
        second = start_run(tmp_path, provider, env_extra={"TRIAGE_COMMIT_SECONDS": "30"})
        stdout, stderr = second.communicate(timeout=300)
        assert second.returncode == 0, stderr
        sent = provider.stats()["requests"]
    frame = pd.read_parquet(tmp_path / "out")
    assert sorted(frame["call_id"]) == sorted(f"r{i:03d}" for i in range(rows))  # each row exactly once
    assert frame["errors"].isna().all()
    for row in frame.itertuples():
        assert row.transcript == transcripts[int(row.call_id[1:])]
        assert row.priority == expected_answer(row.transcript)["priority"]
    assert not list((tmp_path / "out").glob("_journal-*"))
    assert " skipped as already done" in stdout and not stdout.startswith(f"{rows} rows in, 0 skipped")
    assert sent <= 1.1 * 2 * rows, f"{sent} requests for the {2 * rows} a clean run sends"


def stage_workers(session: int, stage: str) -> list[int]:
    """The pids of a stage's Ray actors among the processes of one run's session."""
    marker = f"MapWorker(MapBatches({stage}))".encode()
    return [pid for pid, cmdline in session_processes(session).items() if marker in cmdline]


def test_a_worker_that_dies_mid_run_costs_only_its_rows(tmp_path, start_run):
    transcripts = write_calls(tmp_path, 80)
    with FakeProvider(latency=0.1) as provider:
        run = start_run(tmp_path, provider)
        wait_for(
            lambda: provider.stats()["requests"] >= 20 and stage_workers(run.pid, "TriageStage"),
            180,
            "the triage stage at work",
        )
        victims = stage_workers(run.pid, "TriageStage")
        at_kill = provider.stats()
        for pid in victims:
            send(pid, run.pid, signal.SIGKILL)
        assert wait_gone(victims, 30), "the triage worker survived SIGKILL"
        stdout, stderr = run.communicate(timeout=300)
        asked = provider.stats()["per_transcript"]
    assert len(victims) == 1  # --concurrency 4: one triage actor
    assert run.returncode == 0, stderr
    assert "80 rows out, 0 with errors" in stdout
    frame = pd.read_parquet(tmp_path / "out")
    assert sorted(frame["call_id"]) == [f"r{i:03d}" for i in range(80)]
    assert frame["errors"].isna().all()
    # A row costs two requests, one per stage. The rows of the dead worker's unfinished tasks, and only
    # those, were triaged again: one more request each, only rows under way when it died, and no more
    # of them than the actor holds (tasks at once x rows per task).
    assert set(asked) == {transcript_key(t) for t in transcripts} and min(asked.values()) == 2
    redone = {key for key, count in asked.items() if count > 2}
    plan = plan_pools(Settings(model="openai/fake", concurrency=CONCURRENCY), cpus=2)
    assert redone, "the kill cost nothing: no row was asked again"
    assert max(asked.values()) == 3
    assert redone <= set(at_kill["per_transcript"])
    assert len(redone) <= TASKS_PER_ACTOR * rows_per_block(plan) < len(transcripts)
