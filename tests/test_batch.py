"""`run --batch` against a local fake of OpenAI's and Anthropic's batch APIs (tests.fake_batch_provider).

The fake's answers are a function of each request's transcript, so a row given another row's
answer shows; it counts every HTTP request and every request inside a job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from tests.doubles import committed_programs_unbounded
from tests.fake_batch_provider import MARKER_BATCH_ERROR, FakeBatchProvider
from tests.fake_provider import MARKER_MALFORMED, expected_answer, transcript_key
from tests.processes import stop_session
from triage.batch.ledger import PREFIX, Ledger
from triage.manifest import estimated_cost
from triage.schema import OUTPUT_SCHEMA
from triage.settings import Settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("priority", "category", "summary", "location", "subject_description")
KEY = "sk-batch-test-0123456789"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from triage.pipeline import init_ray

    init_ray()
    yield
    ray.shutdown()


def write_calls(path: Path, transcripts: list[str]) -> list[str]:
    ids = [f"c{i:04d}" for i in range(len(transcripts))]
    path.write_text(
        "".join(json.dumps({"call_id": i, "transcript": t}) + "\n" for i, t in zip(ids, transcripts, strict=True))
    )
    return ids


def calls(count: int) -> list[str]:
    return [f"Caller {i}: smoke from the roof of number {i * 3} Oak Lane, kids inside" for i in range(count)]


def settings_for(tmp_path: Path, provider: FakeBatchProvider, output: str, **extra) -> Settings:
    values = dict(
        input=str(tmp_path / "calls.jsonl"),
        output=str(tmp_path / output),
        model="openai/gpt-4.1-mini",
        api_base=provider.url,
        api_key=SecretStr(KEY),
        optimized_dir=committed_programs_unbounded(tmp_path / "programs"),  # nearest-call demos per row
        concurrency=8,
        cache=False,
        batch_poll_seconds=0.05,
    )
    return Settings(**(values | extra))


def assert_own_answers(frame: pd.DataFrame, transcripts: dict[str, str], skip: set[str] = frozenset()) -> None:
    for row in frame.itertuples():
        if row.call_id in skip:
            continue
        wanted = expected_answer(transcripts[row.call_id])
        assert row.errors is None or pd.isna(row.errors), (row.call_id, row.errors)
        assert tuple(getattr(row, name) for name in FIELDS) == tuple(wanted[name] for name in FIELDS), row.call_id


def test_batch_writes_the_dataset_an_online_run_writes_each_request_sent_once(tmp_path, ray_local):
    from triage.pipeline import run

    transcripts = calls(1000)
    ids = write_calls(tmp_path / "calls.jsonl", transcripts)
    with FakeBatchProvider(polls=3) as provider:
        online = run(settings_for(tmp_path, provider, "online"))
        online_stats = provider.stats()
        provider.reset_stats()
        batch = run(settings_for(tmp_path, provider, "batch", batch=True, batch_max_requests=600))
        stats = provider.stats()

    assert (online.rows_out, batch.rows_out, batch.rows_with_errors) == (1000, 1000, 0)
    online_frame = pd.read_parquet(tmp_path / "online").sort_values("call_id").reset_index(drop=True)
    frame = pd.read_parquet(tmp_path / "batch").sort_values("call_id").reset_index(drop=True)
    assert all(pq.read_schema(part) == OUTPUT_SCHEMA for part in (tmp_path / "batch").glob("*.parquet"))
    assert list(frame["call_id"]) == ids  # one row per input row
    columns = ["call_id", "transcript", *FIELDS, "review", "errors", "model", "prompt_tokens", "completion_tokens"]
    pd.testing.assert_frame_equal(frame[columns], online_frame[columns])
    assert_own_answers(frame, dict(zip(ids, transcripts, strict=True)))

    # Each row's two requests reached the server once, inside a job; nothing went online.
    assert stats["batch_per_transcript"] == {transcript_key(t): 2 for t in transcripts}
    assert stats["per_transcript"] == {} and online_stats["batch_requests"] == 0
    assert stats["routes"]["POST /v1/batches"] == 4  # 2,000 requests, at most 600 per job (3 rows' worth of 2)
    assert stats["routes"]["GET /v1/batches/{id}"] >= 4 * 3  # every job needed several polls

    # The manifest: job ids and the batch price, half of what the same tokens cost online.
    manifest = json.loads((tmp_path / "batch" / "_manifest.json").read_text())
    section = manifest["batch"]
    assert sorted(job["id"] for job in section["jobs"]) == sorted(stats["jobs"])
    assert all(job["id"] in batch.line() for job in section["jobs"])
    assert section["price_factor"] == 0.5 and section["online_tokens"] == {"prompt": 0, "completion": 0}
    tokens = manifest["tokens"]
    assert section["tokens"] == {"prompt": tokens["prompt"], "completion": tokens["completion"]}
    assert tokens["prompt"] > 0 and tokens["cached_prompt"] == 0  # the fake server reports no cache hits
    full = estimated_cost("openai/gpt-4.1-mini", tokens["prompt"], tokens["completion"])
    assert manifest["estimated_cost_usd"] == pytest.approx(full / 2)
    online_manifest = json.loads((tmp_path / "online" / "_manifest.json").read_text())
    assert online_manifest["tokens"] == tokens  # the same requests, the same tokens...
    assert manifest["estimated_cost_usd"] == pytest.approx(online_manifest["estimated_cost_usd"] / 2)  # half price


@pytest.mark.parametrize("model", ["openai/gpt-4.1-mini", "anthropic/claude-sonnet-4-5"])
def test_failed_and_expired_requests_end_as_answers_or_errors_never_lost(tmp_path, ray_local, model):
    from triage.pipeline import run

    transcripts = calls(30)
    transcripts[2] = f"{MARKER_BATCH_ERROR}: the caller hung up"
    transcripts[4] = f"{MARKER_MALFORMED}: no answer about this one parses"
    ids = write_calls(tmp_path / "calls.jsonl", transcripts)
    by_id = dict(zip(ids, transcripts, strict=True))
    # 20 requests (10 rows) per job: job 1 completes (with one request failed inside it), job 2 expires
    # with half its answers, job 3 fails whole.
    with FakeBatchProvider(polls=2, fates=["completed", "expired", "failed"]) as provider:
        summary = run(settings_for(tmp_path, provider, "out", model=model, batch=True, batch_max_requests=20))
        stats = provider.stats()

    frame = pd.read_parquet(tmp_path / "out")
    assert sorted(frame["call_id"]) == ids and summary.rows_out == 30  # every row exactly once
    assert_own_answers(frame, by_id, skip={"c0004"})
    bad = frame.set_index("call_id").loc["c0004", "errors"]
    assert bad.startswith("triage: InvalidAnswer") and "extract_details: InvalidAnswer" in bad
    # Asked again online: the request failed inside job 1, the expired half of job 2, all of job 3,
    # and the answer that never parses (3 validation attempts per stage).
    again = {transcript_key(by_id[i]): n for i, n in [("c0002", 2), ("c0004", 6)]}
    again |= {transcript_key(by_id[f"c{i:04d}"]): 2 for i in [*range(15, 20), *range(20, 30)]}
    assert stats["per_transcript"] == again
    assert stats["batch_per_transcript"] == {transcript_key(t): 2 for t in transcripts}


def test_batch_retry_batch_sends_failures_in_a_new_job_not_online(tmp_path, ray_local):
    from triage.pipeline import run

    transcripts = calls(12)
    transcripts[1] = f"{MARKER_MALFORMED}: no answer about this one parses"
    ids = write_calls(tmp_path / "calls.jsonl", transcripts)
    with FakeBatchProvider(polls=1, fates=["expired"]) as provider:
        summary = run(settings_for(tmp_path, provider, "out", batch=True, batch_retry="batch", validation_attempts=2))
        stats = provider.stats()

    frame = pd.read_parquet(tmp_path / "out")
    assert sorted(frame["call_id"]) == ids and summary.rows_with_errors == 1
    assert_own_answers(frame, dict(zip(ids, transcripts, strict=True)), skip={"c0001"})
    assert "InvalidAnswer" in frame.set_index("call_id").loc["c0001", "errors"]
    assert stats["per_transcript"] == {}  # nothing online
    rounds = [job["round"] for job in json.loads((tmp_path / "out" / "_manifest.json").read_text())["batch"]["jobs"]]
    assert rounds == [1, 2]  # the expired half and the unparseable answer went in a second job
    assert stats["batch_per_transcript"][transcript_key(transcripts[1])] == 4  # two rounds, both stages
    assert stats["batch_per_transcript"][transcript_key(transcripts[0])] == 2  # answered in round 1


def test_no_wait_submits_and_a_rerun_collects(tmp_path, ray_local):
    from triage.pipeline import run

    transcripts = calls(40)
    ids = write_calls(tmp_path / "calls.jsonl", transcripts)
    with FakeBatchProvider(polls=3) as provider:  # one look per run: done at the third
        settings = settings_for(tmp_path, provider, "out", batch=True, no_wait=True)
        first = run(settings)
        assert first.pending and first.rows_out == 0
        assert (
            first.line().startswith("submitted: 1 batch job(s) (batch_")
            and "run the same command again" in first.line()
        )
        assert len(Ledger(tmp_path / "out").jobs) == 1
        second = run(settings)  # still running after one more look: the same line, nothing new submitted
        assert second.pending
        third = run(settings)  # a few polls later the job is done: collected
        stats = provider.stats()
    assert not third.pending and third.rows_out == 40 and third.rows_with_errors == 0
    assert stats["routes"]["POST /v1/batches"] == 1
    assert stats["batch_per_transcript"] == {transcript_key(t): 2 for t in transcripts}
    assert_own_answers(pd.read_parquet(tmp_path / "out"), dict(zip(ids, transcripts, strict=True)))


def test_a_model_without_a_batch_api_is_one_line_and_exit_2(tmp_path, capsys):
    from triage.cli import main

    (tmp_path / "calls.jsonl").write_text('{"transcript": "hello"}\n')
    code = main(["run", "--batch", "--input", str(tmp_path / "calls.jsonl"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --batch: local/smollm2-135m has no provider batch API")
    assert not (tmp_path / "out").exists()


def test_sigkill_while_waiting_then_the_same_command_submits_nothing_new(tmp_path):
    transcripts = calls(60)
    ids = write_calls(tmp_path / "calls.jsonl", transcripts)
    ray_temp = tempfile.mkdtemp(prefix="ray-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIAGE_", "RAY_ADDRESS"))}
    env.update(TRIAGE_CACHE="false", RAY_TMPDIR=ray_temp, TRIAGE_BATCH_POLL_SECONDS="0.1", TRIAGE_API_KEY=KEY)
    programs = committed_programs_unbounded(tmp_path / "programs")
    env.update(TRIAGE_BATCH_MAX_REQUESTS="50", TRIAGE_OPTIMIZED_DIR=programs, PYTHONPATH=str(ROOT))
    started: list[subprocess.Popen] = []

    def start(provider: FakeBatchProvider) -> subprocess.Popen:
        command = [sys.executable, "-m", "triage", "run", "--batch", "--input", "calls.jsonl", "--output", "out"]
        command += ["--model", "openai/gpt-4.1-mini", "--api-base", provider.url]
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(process)
        return process

    try:
        with FakeBatchProvider(polls=10**9) as provider:  # the jobs run until the test lets them end
            first = start(provider)
            deadline = time.monotonic() + 240
            while not (
                len(jobs := Ledger(tmp_path / "out").jobs if (tmp_path / "out").is_dir() else []) == 3
                and all(job.id for job in jobs)
                and provider.stats()["routes"].get("GET /v1/batches/{id}", 0) >= 6
            ):
                assert first.poll() is None and time.monotonic() < deadline, "the run never got to waiting"
                time.sleep(0.2)
            first.send_signal(signal.SIGKILL)  # the driver, by its pid, while it waits on the jobs
            first.wait(timeout=30)
            stop_session(first.pid)  # what is left of its Ray
            created = provider.stats()["routes"]["POST /v1/batches"]
            assert created == 3 and not list((tmp_path / "out").glob("part-*"))

            provider.polls = 0  # the jobs end at the next look
            second = start(provider)
            stdout, stderr = second.communicate(timeout=300)
            stats = provider.stats()
    finally:
        for process in started:
            stop_session(process.pid)
            if process.poll() is None:
                process.kill()
        shutil.rmtree(ray_temp, ignore_errors=True)

    assert second.returncode == 0, stderr
    assert "60 rows in, 0 skipped as already done, 60 triaged, 60 rows out, 0 with errors" in stdout
    assert stats["routes"]["POST /v1/batches"] == 3 and stats["routes"]["POST /v1/files"] == 3  # nothing new
    assert stats["batch_per_transcript"] == {transcript_key(t): 2 for t in transcripts}  # each request once
    assert stats["per_transcript"] == {}
    assert_own_answers(pd.read_parquet(tmp_path / "out"), dict(zip(ids, transcripts, strict=True)))
    assert len(list((tmp_path / "out").glob(f"{PREFIX}*"))) == 3


def test_a_server_without_batch_routes_is_one_line_and_leaves_no_job_behind(tmp_path, ray_local):
    from tests.fake_provider import FakeProvider
    from triage.errors import TriageError
    from triage.pipeline import run

    write_calls(tmp_path / "calls.jsonl", calls(3))
    with FakeProvider() as provider:  # chat completions only: no /files, no /batches
        settings = settings_for(tmp_path, provider, "out", model="openai/my-model", batch=True)  # type: ignore[arg-type]
        with pytest.raises(TriageError, match=r"^batch submit failed \(openai\): .*HTTP 404") as caught:
            run(settings)
    assert "\n" not in str(caught.value) and KEY not in str(caught.value)
    assert Ledger(tmp_path / "out").jobs == []  # refused outright: nothing to collect on a rerun


def test_an_answer_is_never_given_to_a_prompt_it_was_not_asked_for(tmp_path, ray_local):
    from triage.pipeline import run

    transcripts = calls(10)
    ids = write_calls(tmp_path / "calls.jsonl", transcripts)
    with FakeBatchProvider(polls=2) as provider:
        assert run(settings_for(tmp_path, provider, "out", batch=True, no_wait=True)).pending  # nearest-call demos
        # Collected with other programs (the default prompts): every batch answer was for another prompt.
        changed = settings_for(tmp_path, provider, "out", batch=True, optimized_dir=str(tmp_path / "none"))
        summary = run(changed)
        stats = provider.stats()
    assert summary.rows_out == 10 and summary.rows_with_errors == 0
    assert stats["per_transcript"] == {transcript_key(t): 2 for t in transcripts}  # all asked again online
    assert_own_answers(pd.read_parquet(tmp_path / "out"), dict(zip(ids, transcripts, strict=True)))
