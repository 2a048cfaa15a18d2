"""Batch mode's pieces without Ray or a server: job splitting, custom_id -> row and stage, the ledger,
rendering and replaying through DSPy."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
from dspy.lm15 import BatchEntry, ErrorDetail, Message, Response, TextPart, Usage

from tests.doubles import chat_answer, committed_programs_unbounded, fields_for
from triage.batch.collect import job_answers, request_changed
from triage.batch.engine import REPLAY, Replay, RequestChanged, replay_lm, request_from_json, request_sha
from triage.batch.ledger import Ledger
from triage.batch.plan import JobLimits, PlannedRequest, Planner, request_bytes
from triage.batch.render import RenderConfig, RenderRequests
from triage.cost import estimated_cost, prices
from triage.errors import ConfigError
from triage.settings import Settings
from triage.stages import ExtractDetailsStage, ProgramSource, TriageStage


def row(call_id: str, size: int = 100) -> list[PlannedRequest]:
    return [PlannedRequest(call_id, stage, "x" * size, f"sha-{call_id}-{stage}") for stage in ("triage", "details")]


def plan(limits: JobLimits, rows: list[list[PlannedRequest]]) -> list[list[str]]:
    planner = Planner(limits)
    jobs = [job for r in rows for job in planner.add_row(r)] + list(planner.finish())
    return [[f"{r.call_id}/{r.stage}" for r in job.requests] for job in jobs]


def test_jobs_split_under_the_request_limit_and_keep_a_rows_requests_together():
    jobs = plan(JobLimits(requests=5, bytes=10**9), [row(f"r{i}") for i in range(5)])
    assert [len(job) for job in jobs] == [4, 4, 2]  # 5 would split a row: a job closes at 4
    assert jobs[0] == ["r0/triage", "r0/details", "r1/triage", "r1/details"]


def test_jobs_split_under_the_byte_limit_and_an_oversized_row_goes_online():
    per_row = 2 * request_bytes("x" * 1000)
    planner = Planner(JobLimits(requests=10**6, bytes=per_row * 2))
    jobs = [
        job for r in [row("a", 1000), row("b", 1000), row("huge", 10**6), row("c", 1000)] for job in planner.add_row(r)
    ]
    jobs += list(planner.finish())
    assert [job.call_ids for job in jobs] == [["a", "b"], ["c"]]
    assert all(job.bytes <= per_row * 2 for job in jobs)
    assert planner.too_large == ["huge"]


def test_limits_default_to_the_providers_and_settings_override_them():
    assert JobLimits.for_settings(Settings(model="openai/x")) == JobLimits(50_000, 200_000_000)
    assert JobLimits.for_settings(Settings(model="anthropic/x")) == JobLimits(100_000, 256_000_000)
    assert JobLimits.for_settings(Settings(model="openai/x", batch_max_requests=3, batch_max_bytes=9)) == JobLimits(
        3, 9
    )


def _response(text: str) -> Response:
    return Response(
        id="r",
        model="m",
        message=Message.assistant([TextPart(text)]),
        finish_reason="stop",
        usage=Usage(input_tokens=5, output_tokens=3),
    )


def test_custom_id_ties_each_answer_to_its_row_and_stage(tmp_path):
    ledger = Ledger(tmp_path)
    keys = [("a", "triage", "s1", None), ("a", "details", "s2", None), ("b", "triage", "s3", "fix it")]
    job = ledger.new_job("openai/x", 1, keys)
    job.id, job.status = "batch_1", "expired"
    entries = [  # out of order, one errored, one missing (expired)
        BatchEntry(index=2, outcome="errored", error=ErrorDetail(code="provider", message="boom")),
        BatchEntry(index=0, outcome="succeeded", response=_response("for a")),
    ]
    answers = job_answers(job, entries)
    assert '"for a"' in answers[("a", "triage")]["response"] and answers[("a", "triage")]["sha"] == "s1"
    assert answers[("a", "details")]["response"] is None
    assert answers[("a", "details")]["problem"] == "no answer in batch job batch_1 (expired)"
    assert answers[("b", "triage")]["problem"] == "failed in batch job batch_1: boom"
    assert answers[("b", "triage")]["feedback"] == "fix it"


def test_the_ledger_survives_a_restart_and_refuses_another_model(tmp_path):
    ledger = Ledger(tmp_path)
    job = ledger.new_job("openai/x", 1, [("a", "triage", "s", None)])
    job.id = "batch_9"
    ledger.save(job)
    again = Ledger(tmp_path)
    assert [(j.id, j.call_ids, j.label) for j in again.jobs] == [("batch_9", {"a"}, job.label)]
    again.check_model("openai/x")
    with pytest.raises(ConfigError, match="holds batch jobs for openai/x"):
        again.check_model("anthropic/y")


def test_batch_price_is_half_the_online_price_for_openai_and_anthropic():
    for model in ("openai/gpt-4.1-mini", "anthropic/claude-sonnet-4-5"):
        full = estimated_cost(model, 1000, 100)
        assert full and estimated_cost(model, 1000, 100, batch=True) == pytest.approx(full / 2)
    assert prices("ollama_chat/llama3", batch=True) is None  # no batch API


def _renderer() -> RenderRequests:
    settings = Settings(model="openai/gpt-4.1-mini")
    folder = committed_programs_unbounded(Path(tempfile.mkdtemp()))
    programs = {s.name: ProgramSource.load(folder, s.program_file) for s in (TriageStage, ExtractDetailsStage)}
    return RenderRequests(RenderConfig(settings, (TriageStage, ExtractDetailsStage), programs))


def test_render_records_the_request_the_online_program_sends_with_its_nearest_demos():
    renderer = _renderer()
    text = renderer.render("triage", "A man collapsed in the bakery on Main Street, not breathing", None)
    request = request_from_json(text)
    assert request.model == "gpt-4.1-mini"
    users = [m for m in request.messages if m.role == "user"]
    assert len(users) >= 2  # demos (nearest labelled calls) come before the transcript
    assert "A man collapsed in the bakery" in users[-1].parts[0].text
    assert "Triage a 911 call" in request.system
    other = renderer.render("triage", "A dog is barking all night next door", None)
    assert request_from_json(other).messages[0] != request.messages[0]  # demos chosen per call
    with_feedback = renderer.render("triage", "A man collapsed in the bakery on Main Street, not breathing", "FIX")
    assert (
        with_feedback != text
        and users[-1].parts[0].text + "\n\nFIX"
        == [m for m in request_from_json(with_feedback).messages if m.role == "user"][-1].parts[0].text
    )


def test_replay_parses_the_batch_answer_and_refuses_a_changed_prompt():
    import dspy

    from triage.lm import ChatAdapter

    renderer = _renderer()
    transcript = "A man collapsed in the bakery on Main Street, not breathing"
    sha = request_sha(renderer.render("triage", transcript, None))
    program = renderer.programs["triage"]
    answer = _response(chat_answer(fields_for("triage", priority="urgent", category="medical")))
    lm = replay_lm("openai/gpt-4.1-mini")

    async def replay(expected_sha: str):
        token = REPLAY.set(Replay(answer, expected_sha))
        try:
            with dspy.context(lm=lm, adapter=ChatAdapter(), disable_history=True):
                return await program.acall(transcript=transcript)
        finally:
            REPLAY.reset(token)

    prediction = asyncio.run(replay(sha))
    assert (prediction.priority, prediction.category) == ("urgent", "medical")
    with pytest.raises(Exception) as caught:
        asyncio.run(replay(sha[::-1]))  # not the request that was submitted
    assert isinstance(request_changed(caught.value), RequestChanged)


def test_render_only_the_stages_a_retry_round_asks_for():
    renderer = _renderer()
    renderer.only = {"b": {"extract_details": "FIX"}}
    table = pa.table({"call_id": ["a", "b"], "transcript": ["one call", "another call"]})
    out = renderer(table)
    assert out.column("call_id").to_pylist() == ["b"]
    requests = json.loads(out.column("requests")[0].as_py())
    assert [(r["stage"], r["feedback"]) for r in requests] == [("extract_details", "FIX")]
