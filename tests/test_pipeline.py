"""End to end: the real pipeline, Ray included, against a local OpenAI-compatible server.

The server's answer is a function of the transcript (`expected_answer`), so a row that got
another row's answer shows. Faults are injected at a few percent of requests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from tests.fake_provider import FakeProvider, expected_answer, transcript_key
from triage.schema import OUTPUT_SCHEMA
from triage.settings import Settings

pytestmark = pytest.mark.slow

FIELDS = ("priority", "category", "summary", "location", "subject_description")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from triage.pipeline import init_ray

    init_ray()
    yield
    ray.shutdown()


def write_calls(path: Path, transcripts: list[str]) -> list[str]:
    ids = [f"call-{i:03d}" for i in range(len(transcripts))]
    path.write_text(
        "".join(json.dumps({"call_id": i, "transcript": t}) + "\n" for i, t in zip(ids, transcripts, strict=True))
    )
    return ids


def test_every_row_once_with_its_own_answers_under_faults(tmp_path, ray_local):
    transcripts = [f"Caller {i}: there is trouble at house number {i * 7}, please come." for i in range(60)]
    transcripts[10] = "ALWAYS_MALFORMED my answer will never parse"
    transcripts[20] = "   "
    ids = write_calls(tmp_path / "calls.jsonl", transcripts)
    output = tmp_path / "out"
    with FakeProvider(
        rate_429=0.04, rate_500=0.03, rate_malformed=0.03, retry_after=0.05, seed=7, api_key="sk-e2e-secret-000111"
    ) as provider:
        settings = Settings(
            input=str(tmp_path / "calls.jsonl"),
            output=str(output),
            model="openai/fake",
            api_base=provider.url,
            api_key=SecretStr("sk-e2e-secret-000111"),
            concurrency=8,
            rpm=6000,  # far above what 60 rows need: the limiter only counts, and absorbs the 429s
            cache=False,
            optimized_dir=str(tmp_path / "no-programs"),  # the default prompts, whatever optimized/ holds
        )
        from triage.pipeline import run

        summary = run(settings)
        stats = provider.stats()

    assert (summary.rows_in, summary.skipped, summary.triaged) == (60, 0, 60)
    assert (summary.rows_out, summary.rows_with_errors, summary.rows_to_review) == (60, 2, 58)
    assert all(pq.read_schema(part) == OUTPUT_SCHEMA for part in output.glob("*.parquet"))
    frame = pd.read_parquet(output)
    assert sorted(frame["call_id"]) == ids  # every input row exactly once
    assert stats["outcomes"]["429"] > 0 and stats["outcomes"]["500"] > 0 and stats["outcomes"]["malformed"] > 0

    for row in frame.itertuples():
        transcript = transcripts[int(row.call_id.split("-")[1])]
        if row.call_id == "call-010":
            assert row.errors.startswith("triage: InvalidAnswer") and "extract_details: InvalidAnswer" in row.errors
            assert all(pd.isna(getattr(row, f)) for f in FIELDS)
        elif row.call_id == "call-020":
            assert row.errors == "input: empty transcript" and row.prompt_tokens == 0
            assert pd.isna(row.transcript)
        else:
            assert row.transcript == transcript
            expected = expected_answer(transcript)
            assert pd.isna(row.errors), row.errors
            assert {f: getattr(row, f) for f in FIELDS} == {f: expected[f] for f in FIELDS}
            # The fake provider's location and subject are in no transcript: flagged, kept as answered
            # (beside "answered on attempt N" where injected malformed answers were asked again: the
            # faults are drawn per request, so a row may draw two).
            reasons = [r for r in row.review.split("; ") if not r.startswith("answered on attempt ")]
            assert reasons == [
                f"location not in the transcript: {expected['location']!r}",
                f"subject not in the transcript: {expected['subject_description']!r}",
            ]
            assert row.prompt_tokens > 0 and row.completion_tokens > 0
        assert row.model == "openai/fake"
    assert "sk-e2e-secret-000111" not in frame.to_csv()
    manifest_text = (output / "_manifest.json").read_text()
    assert "sk-e2e-secret-000111" not in manifest_text
    manifest = json.loads(manifest_text)
    assert manifest["rows"] == {
        "in": 60,
        "skipped_as_done": 0,
        "triaged": 60,
        "out": 60,
        "with_errors": 2,
        "to_review": 58,
        "errors_this_run": 2,
        "duplicate_call_ids": 0,
    }
    assert manifest["tokens"]["prompt"] == int(frame["prompt_tokens"].sum()) > 0
    # Every 429 the provider sent reached the shared limiter, and no request went out without a booking.
    limits = manifest["rate_limit"]
    assert limits["rpm"] == 6000 and limits["429s"] == stats["outcomes"]["429"] > 0
    assert limits["requests"] >= stats["requests"] > 0
    assert manifest["model"] == "openai/fake" and manifest["settings"]["api_key"] == "****"
    assert manifest["programs"]["triage"].startswith("default prompts")


def test_rerun_resumes_limit_is_honoured_and_overwrite_starts_afresh(tmp_path, ray_local):
    transcripts = [f"call about thing {i}" for i in range(12)]
    write_calls(tmp_path / "calls.jsonl", transcripts)
    output = tmp_path / "out"
    from triage.pipeline import run

    with FakeProvider() as provider:
        base = Settings(
            input=str(tmp_path / "calls.jsonl"),
            output=str(output),
            model="openai/fake",
            api_base=provider.url,
            concurrency=4,
            cache=False,
        )
        first = run(base.model_copy(update={"limit": 5}))
        assert (first.rows_in, first.skipped, first.triaged, first.rows_out) == (5, 0, 5, 5)
        provider.reset_stats()
        second = run(base)
        assert (second.rows_in, second.skipped, second.triaged, second.rows_out) == (12, 5, 7, 12)
        asked = provider.stats()["per_transcript"]
        assert sorted(asked) == sorted(transcript_key(t) for t in transcripts[5:])  # done rows not sent again
        third = run(base)
        assert (third.skipped, third.triaged, third.rows_out) == (12, 0, 12)
        fourth = run(base.model_copy(update={"overwrite": True, "limit": 3}))
        assert (fourth.skipped, fourth.triaged, fourth.rows_out) == (0, 3, 3)
    frame = pd.read_parquet(output)
    assert sorted(frame["call_id"]) == ["call-000", "call-001", "call-002"]


def test_output_folder_with_foreign_files_is_refused(tmp_path):
    from triage.errors import ConfigError
    from triage.pipeline import run

    (tmp_path / "calls.jsonl").write_text('{"transcript": "x"}\n')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.docx").write_text("precious")
    with pytest.raises(ConfigError, match="holds files that are not this dataset's"):
        run(
            Settings(
                input=str(tmp_path / "calls.jsonl"),
                output=str(tmp_path / "out"),
                model="openai/x",
                api_base="http://127.0.0.1:9/v1",
            )
        )
    assert (tmp_path / "out" / "thesis.docx").read_text() == "precious"


def test_shared_rate_limit_keeps_a_limited_provider_happy(tmp_path, ray_local):
    transcripts = [f"rate limited call number {i} about a fallen tree" for i in range(40)]
    write_calls(tmp_path / "calls.jsonl", transcripts)
    from triage.pipeline import run

    with FakeProvider(rpm=900, latency=0.02) as provider:
        summary = run(
            Settings(
                input=str(tmp_path / "calls.jsonl"),
                output=str(tmp_path / "out"),
                model="openai/fake",
                api_base=provider.url,
                concurrency=16,
                rpm=900,
                cache=False,
                optimized_dir=str(tmp_path / "no-programs"),  # the default prompts, whatever optimized/ holds
            )
        )
        stats = provider.stats()
    assert (summary.rows_out, summary.rows_with_errors) == (40, 0)
    assert stats["outcomes"]["ok"] == 80
    assert stats["outcomes"]["429"] <= 2  # at most 2.5% of requests, and every row still succeeded


@pytest.mark.parametrize("cpus", [1.0, 2.0, 8.0])
def test_pool_plans_leave_room_for_reading_and_respect_the_budget(cpus):
    from triage.pipeline import READ_CPUS, plan_pools

    for settings in (Settings(), *(Settings(model="openai/x", concurrency=c) for c in (2, 5, 64, 1000))):
        plans = plan_pools(settings, cpus)
        assert sum(p.actors * p.num_cpus for p in plans) + READ_CPUS <= cpus
        if settings.model.startswith("openai/"):
            assert sum(p.actors * p.in_flight for p in plans) <= settings.concurrency
        else:  # the embedded model: one request, one task at a time per actor
            assert all((p.in_flight, p.tasks_per_actor) == (1, 1) for p in plans)


def test_blocks_hold_one_batch_of_rows_not_thousands(tmp_path):
    from triage.pipeline import target_block_bytes

    short, long = tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    short.write_text("".join(json.dumps({"call_id": f"s{i}", "transcript": "fire"}) + "\n" for i in range(1000)))
    long.write_text("".join(json.dumps({"call_id": f"l{i}", "transcript": "x" * 4000}) + "\n" for i in range(10)))
    hosted = Settings(model="openai/x")
    assert target_block_bytes(Settings(), [short], 1000, 4) == 1  # embedded model: one row per block
    short_row = short.stat().st_size / 1000
    assert target_block_bytes(hosted, [short], 1000, 32) == pytest.approx(32 * (short_row + 400), rel=0.01)
    assert target_block_bytes(hosted, [long], 10, 32) == pytest.approx(32 * (4000 + 450), rel=0.05)


def test_the_embedded_default_model_triages_every_row(tmp_path, ray_local):
    """The offline path of `make triage`: no key, no server, the real 135M model under a grammar."""
    from triage.programs import CATEGORIES, PRIORITIES
    from triage.settings import DEFAULT_MODEL

    transcripts = [
        "My kitchen is on fire and my little girl is still upstairs! 418 Larkspur Lane, hurry!",
        "The people at 12 Oak Street have been playing loud music since midnight.",
        "Is the DMV open on Saturdays? Sorry, I didn't know who else to call.",
    ]
    ids = write_calls(tmp_path / "calls.jsonl", transcripts)
    from triage.pipeline import run

    summary = run(Settings(input=str(tmp_path / "calls.jsonl"), output=str(tmp_path / "out"), cache=False))
    assert (summary.rows_out, summary.rows_with_errors) == (3, 0)
    frame = pd.read_parquet(tmp_path / "out")
    assert sorted(frame["call_id"]) == ids
    assert set(frame["priority"]) <= set(PRIORITIES) and set(frame["category"]) <= set(CATEGORIES)
    assert all(isinstance(s, str) and s.strip() for s in frame["summary"])
    assert (frame["model"] == DEFAULT_MODEL).all() and (frame["completion_tokens"] > 0).all()
    assert frame["errors"].isna().all()
    # `make triage` runs the programs committed in optimized/ (compiled for this model), and says so.
    from triage.pipeline import STAGES
    from triage.stages import ProgramSource

    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    for stage in STAGES:
        label = ProgramSource.load("optimized", stage.program_file).label
        assert label.startswith(f"optimized/{stage.program_file} (sha256 ")
        assert manifest["programs"][stage.name] == label
