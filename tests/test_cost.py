"""The cost ceiling (--max-cost): prices, the estimate before a run, refusing to start, stopping mid-run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.doubles import committed_programs_unbounded, scripted_lm, transcript_of
from tests.fake_provider import FakeProvider, expected_answer, format_content, parse_request
from tests.test_cli import triage_cli
from triage.cost import Prices, estimate_run, estimated_cost, prices
from triage.inputs import scan_inputs
from triage.lm import ChatAdapter, LMSetup
from triage.settings import Settings
from triage.stages import ExtractDetailsStage, ProgramSource, StageConfig, TriageStage

ROOT = Path(__file__).resolve().parents[1]
PRICED_MODEL = "openai/gpt-4.1-mini"  # the simulated provider answers any name; this one has a price


def write_calls(folder: Path, count: int) -> list[str]:
    transcripts = [
        f"Caller {i}: smoke from the garage at {i + 10} Oak Lane, nobody answers the door." for i in range(count)
    ]
    (folder / "calls.jsonl").write_text(
        "".join(json.dumps({"call_id": f"c{i:03d}", "transcript": t}) + "\n" for i, t in enumerate(transcripts))
    )
    return transcripts


def test_prices_online_batch_and_cached_reads(monkeypatch):
    online, batch = prices(PRICED_MODEL), prices(PRICED_MODEL, batch=True)
    assert online is not None and batch is not None
    assert (batch.input, batch.output) == (online.input / 2, online.output / 2)  # the Batch API's 50%
    assert prices("openai/no-such-model-xyz") is None and prices("groq/llama-3", batch=True) is None
    assert prices("local/smollm2-135m") == Prices(0.0, 0.0, 0.0)
    assert Prices(1.0, 10.0, 0.1).cost(prompt_tokens=100, completion_tokens=2, cached_tokens=60) == 40 + 6 + 20
    assert estimated_cost(PRICED_MODEL, 1000, 0, cached_tokens=1000) < estimated_cost(PRICED_MODEL, 1000, 0)

    # A price list without cached-read or batch prices: the providers' published shares stand in.
    import dspy.clients.model_metadata as metadata

    monkeypatch.setattr(metadata, "model_info", lambda provider, name: {"input_cost_per_token": 1.0})
    assert prices("anthropic/claude-x") == Prices(1.0, 0.0, 0.1)
    assert prices("openai/gpt-x") == Prices(1.0, 0.0, 0.5)
    assert prices("anthropic/claude-x", batch=True) == Prices(0.5, 0.0, 0.05)


def test_the_estimate_counts_the_prompts_the_stages_really_send(tmp_path):
    """Rendered with the committed programs (nearest demos), every row sampled: within 2% of what is sent."""
    transcripts = write_calls(tmp_path, 12)
    files = [tmp_path / "calls.jsonl"]
    settings = Settings(model=PRICED_MODEL, optimized_dir=committed_programs_unbounded(tmp_path / "programs"))
    stages = (TriageStage, ExtractDetailsStage)
    programs = {s.name: ProgramSource.load(settings.optimized_dir, s.program_file) for s in stages}
    assert all(p.state is not None for p in programs.values())
    scan = scan_inputs(files)
    estimate = estimate_run(settings, files, scan, frozenset(scan.call_ids), stages, programs, prices(PRICED_MODEL))

    sent_chars = 0
    for stage_class in stages:
        fields = {"triage": {"priority": "urgent", "category": "fire", "summary": "s"}}.get(
            stage_class.name, {"location": "l", "subject_description": "d"}
        )
        lm, engine = scripted_lm(lambda request, fields=fields: {"reasoning": "r", **fields})
        stage = stage_class(
            StageConfig(settings=settings, program=programs[stage_class.name]), lm_setup=LMSetup(lm, ChatAdapter)
        )
        import asyncio

        for transcript in transcripts:
            asyncio.run(stage.answer(transcript))
        assert [transcript_of(r) for r in engine.requests] == transcripts
        for request in engine.requests:
            system = request.system if isinstance(request.system, str) else ""
            sent_chars += len(system) + sum(len(m.text or "") for m in request.messages)
    assert (estimate.rows, estimate.requests) == (12, 24)
    assert estimate.prompt_tokens == pytest.approx(sent_chars / 4, rel=0.02)


def test_a_ceiling_below_the_estimate_refuses_to_start_and_sends_nothing(tmp_path):
    write_calls(tmp_path, 20)
    with FakeProvider() as provider:
        refused = triage_cli(
            "run",
            "--input",
            "calls.jsonl",
            "--model",
            PRICED_MODEL,
            "--api-base",
            provider.url,
            "--max-cost",
            "0.0001",
            cwd=tmp_path,
        )
        unknown = triage_cli(
            "run",
            "--input",
            "calls.jsonl",
            "--model",
            "openai/fake",
            "--api-base",
            provider.url,
            "--max-cost",
            "5",
            cwd=tmp_path,
        )
        requests = provider.stats()["requests"]
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith("error: estimated cost $0.0") and "for 20 rows (40 requests" in refused.stderr
    assert "above --max-cost $0.0001;" in refused.stderr
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    assert "cannot be enforced: openai/fake has no price" in unknown.stderr
    assert requests == 0  # counted at the server: nothing was sent
    assert not list((tmp_path / "output").rglob("part-*"))


def long_winded(body: dict) -> str:
    """The right answer, with far more reasoning than the estimate allows for: the spend outgrows it."""
    request = parse_request(body)
    values = {name: expected_answer(request.answer_key)[name] for name in request.fields}
    values["reasoning"] = "because " * 3000  # ~3,000 completion tokens, ~$0.005 at gpt-4.1-mini's price
    return format_content(values, request.json_mode)


@pytest.mark.slow
def test_a_ceiling_reached_mid_run_stops_sending_and_a_rerun_with_a_higher_one_finishes(tmp_path):
    import ray

    from triage.pipeline import init_ray, run

    transcripts = write_calls(tmp_path, 40)
    init_ray()
    try:
        with FakeProvider(latency=0.02, handler=long_winded) as provider:
            settings = Settings(
                input=str(tmp_path / "calls.jsonl"),
                output=str(tmp_path / "out"),
                model=PRICED_MODEL,
                api_base=provider.url,
                concurrency=4,
                cache=False,
                max_cost=0.05,  # the estimate (~$0.02) fits; ten long answers do not
                optimized_dir=str(tmp_path / "no-programs"),
            )
            first = run(settings)
            sent_first = provider.stats()["requests"]
            manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
            done_first = set(pd.read_parquet(tmp_path / "out")["call_id"])
            second = run(settings.model_copy(update={"max_cost": 10.0}))
            sent_second = provider.stats()["requests"] - sent_first
    finally:
        ray.shutdown()

    assert first.left_at_ceiling > 0 and first.rows_out + first.left_at_ceiling == 40
    assert first.rows_with_errors == 0  # rows the ceiling stopped are left for the next run, not written as failed
    assert "stopped at --max-cost $0.05 with" in first.line() and "run the same command again" in first.line()
    ceiling = manifest["cost_ceiling"]
    assert ceiling["max_cost_usd"] == 0.05 and ceiling["spent_usd"] >= 0.05 > ceiling["estimated_usd"] > 0
    assert ceiling["requests_refused"] > 0 and ceiling["rows_left"] == first.left_at_ceiling
    # Stopped sending: no row was started past the ceiling, and every row started was finished (its
    # details request too), so nothing paid for was thrown away. 80 requests were needed.
    assert 0 < first.rows_out < 40 and sent_first == 2 * first.rows_out
    assert (second.skipped, second.triaged, second.rows_out, second.left_at_ceiling) == (
        first.rows_out,
        40 - first.rows_out,
        40,
        0,
    )
    assert sent_second == 2 * (40 - first.rows_out)
    assert len(done_first) == first.rows_out
    frame = pd.read_parquet(tmp_path / "out")
    assert sorted(frame["call_id"]) == [f"c{i:03d}" for i in range(40)]  # every row exactly once
    assert frame["errors"].isna().all()
    for row in frame.itertuples():
        assert row.transcript == transcripts[int(row.call_id[1:])]
        assert row.priority == expected_answer(row.transcript)["priority"]


def test_a_run_stopped_at_the_ceiling_exits_3_with_its_summary(monkeypatch, capsys, tmp_path):
    import triage.pipeline
    from triage.cli import main
    from triage.pipeline import RunSummary

    stopped = RunSummary(40, 0, 12, 12, 0, 3, 0, 1.0, "out", left_at_ceiling=28, max_cost=0.05)
    monkeypatch.setattr(triage.pipeline, "run", lambda settings, verbose=False: stopped)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--max-cost", "0.05"]) == 3
    assert capsys.readouterr().out == stopped.line() + "\n"
    assert "stopped at --max-cost $0.05 with 28 rows left: run the same command again" in stopped.line()
    monkeypatch.setattr(
        triage.pipeline, "run", lambda settings, verbose=False: RunSummary(1, 0, 1, 1, 0, 0, 0, 1.0, "o")
    )
    assert main(["run"]) == 0
