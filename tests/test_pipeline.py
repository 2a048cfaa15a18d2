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

from tests.fake_provider import FakeProvider, expected_answer
from triage.schema import OUTPUT_SCHEMA
from triage.settings import Secret, Settings

pytestmark = pytest.mark.slow

FIELDS = ("priority", "category", "summary", "location", "subject_description")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from triage.pipeline import init_ray

    init_ray(Settings())
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
            api_key=Secret("sk-e2e-secret-000111"),
            concurrency=8,
            cache=False,
        )
        from triage.pipeline import run

        summary = run(settings)
        stats = provider.stats()

    assert (summary.rows_in, summary.rows_out, summary.rows_with_errors) == (60, 60, 2)
    assert pq.read_schema(next(output.glob("*.parquet"))) == OUTPUT_SCHEMA
    frame = pd.read_parquet(output)
    assert sorted(frame["call_id"]) == ids  # every input row exactly once
    assert stats["outcomes"]["429"] > 0 and stats["outcomes"]["500"] > 0 and stats["outcomes"]["malformed"] > 0

    for row in frame.itertuples():
        transcript = transcripts[int(row.call_id.split("-")[1])]
        assert row.transcript == transcript
        if row.call_id == "call-010":
            assert row.errors.startswith("triage: InvalidAnswer") and "extract_details: InvalidAnswer" in row.errors
            assert all(pd.isna(getattr(row, f)) for f in FIELDS)
        elif row.call_id == "call-020":
            assert row.errors == "input: empty transcript" and row.prompt_tokens == 0
        else:
            expected = expected_answer(transcript)
            assert pd.isna(row.errors), row.errors
            assert {f: getattr(row, f) for f in FIELDS} == {f: expected[f] for f in FIELDS}
            assert row.prompt_tokens > 0 and row.completion_tokens > 0
        assert row.model == "openai/fake"
    assert "sk-e2e-secret-000111" not in frame.to_csv()


def test_rerun_replaces_the_output_and_limit_is_honoured(tmp_path, ray_local):
    write_calls(tmp_path / "calls.jsonl", [f"call about thing {i}" for i in range(12)])
    output = tmp_path / "out"
    from triage.pipeline import run

    with FakeProvider() as provider:
        base = Settings(
            input=str(tmp_path / "calls.jsonl"),
            output=str(output),
            model="openai/fake",
            api_base=provider.url,
            concurrency=4,
        )
        assert run(base).rows_out == 12
        summary = run(Settings(**{**base.__dict__, "limit": 5}))
    assert (summary.rows_in, summary.rows_out) == (5, 5)
    assert len(pd.read_parquet(output)) == 5
