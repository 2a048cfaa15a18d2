"""`evaluate` against the fake provider, whose answers are a known function of each transcript."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dspy
import pytest

from tests.fake_provider import MARKER_MALFORMED, FakeProvider, expected_answer
from triage.cli import main
from triage.errors import InputError
from triage.evaluation import evaluate, load_labeled
from triage.programs import CallTriager
from triage.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def transcript_answered(priority: str, speaker: str = "Caller") -> str:
    """The first transcript of a fixed series that the fake provider answers with `priority`."""
    for i in range(1000):
        transcript = f"{speaker} {i}: there is a problem on my street, please send someone."
        if expected_answer(transcript)["priority"] == priority:
            return transcript
    raise AssertionError("no transcript found")


def labeled_row(
    call_id: str, transcript: str, priority: str, category: str, location: str = "", subject: str = ""
) -> dict[str, str]:
    return {
        "call_id": call_id,
        "transcript": transcript,
        "priority": priority,
        "category": category,
        "location": location,
        "subject_description": subject,
    }


def wrong(category: str) -> str:
    return "noise" if category != "noise" else "crime"


@pytest.fixture
def labeled_file(tmp_path: Path) -> Path:
    """Five calls whose scores are worked out by hand from the fake provider's answers:

    a: urgent, answered urgent with the right category; location matches after normalization.
    b: urgent, answered non_urgent (under-triage), wrong category.
    c: non_urgent, answered not_an_emergency (under-triage), right category.
    d: not_an_emergency, answered urgent (over-triage), wrong category; subject matches.
    e: urgent, but the provider's answer never parses: a failure in both modules.
    """
    a, b = transcript_answered("urgent"), transcript_answered("non_urgent")
    c, d = transcript_answered("not_an_emergency"), transcript_answered("urgent", speaker="Neighbour")
    e = f"{MARKER_MALFORMED} caller is choking"
    answer = {key: expected_answer(key) for key in (a, b, c, d)}
    rows = [
        labeled_row("a", a, "urgent", answer[a]["category"], location=answer[a]["location"].upper() + "."),
        labeled_row("b", b, "urgent", wrong(answer[b]["category"])),
        labeled_row("c", c, "non_urgent", answer[c]["category"]),
        labeled_row("d", d, "not_an_emergency", wrong(answer[d]["category"]), subject=answer[d]["subject_description"]),
        labeled_row("e", e, "urgent", "medical"),
    ]
    path = tmp_path / "labeled.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp


def fake_settings(provider: FakeProvider, **overrides) -> Settings:
    return Settings(
        model="openai/fake",
        api_base=provider.url,
        cache=False,
        validation_attempts=2,
        max_retries=0,
        concurrency=4,
        **overrides,
    )


def test_evaluate_scores_match_the_hand_computed_ones(provider, labeled_file, tmp_path):
    report = evaluate(fake_settings(provider), labeled_file, tmp_path / "no-programs-here")
    s = report.scores
    assert report.n == 5 and report.model == "openai/fake" and report.data_file == str(labeled_file)
    assert s.priority_accuracy == pytest.approx(1 / 5)  # a
    assert s.category_accuracy == pytest.approx(2 / 5)  # a, c
    assert (s.urgent_found, s.urgent_total) == (1, 3) and s.urgent_recall == pytest.approx(1 / 3)  # a of a, b, e
    assert s.under_triage == 2 and s.over_triage == 1  # b, c / d
    assert s.triage_failed == 1 and s.details_failed == 1  # e
    assert s.location_match == pytest.approx(1 / 5)  # a
    assert s.subject_match == pytest.approx(1 / 5)  # d
    assert s.priority_confusion["urgent"] == {
        "urgent": 1,
        "non_urgent": 1,
        "not_an_emergency": 0,
        "(invalid)": 0,
        "(failed)": 1,
    }
    assert s.priority_confusion["not_an_emergency"]["urgent"] == 1
    assert [f["call_id"] for f in report.failures] == ["e", "e"]
    assert "no valid answer after 2 attempts" in report.failures[0]["error"]
    # Four answers per module plus two tries at the malformed one; every token the provider billed.
    assert (report.usage["triage"].calls, report.usage["extract_details"].calls) == (6, 6)
    stats = provider.stats()
    assert stats["requests"] == 12
    assert report.total_usage.prompt_tokens == stats["prompt_tokens"] > 0
    assert report.total_usage.completion_tokens == stats["completion_tokens"] > 0
    assert report.programs["triage"].startswith("default prompts")


def test_the_report_is_written_as_markdown_and_json(provider, labeled_file, tmp_path):
    report = evaluate(fake_settings(provider), labeled_file, tmp_path)
    md_path, json_path = report.write(tmp_path / "out" / "eval.md")
    assert md_path == tmp_path / "out" / "eval.md" and json_path == tmp_path / "out" / "eval.json"
    markdown = md_path.read_text()
    assert f"- Data: `{labeled_file}` (5 calls)" in markdown
    assert "- Model: `openai/fake`" in markdown
    assert "| priority accuracy | 20.0% |" in markdown
    assert "| urgent recall | 33.3% (1/3) |" in markdown
    assert "| under-triage (predicted less urgent than gold) | 2 |" in markdown
    assert "| failed predictions (triage / extract_details) | 1 / 1 |" in markdown
    assert "| LM calls (triage / extract_details) | 6 / 6 |" in markdown
    assert "| urgent | 1 | 1 | 0 | 1 |" in markdown  # priority confusion row, with the (failed) column
    assert "- e (triage): InvalidAnswer: no valid answer after 2 attempts" in markdown
    data = json.loads(json_path.read_text())
    assert data["n"] == 5 and data["scores"]["urgent_recall"] == pytest.approx(1 / 3)
    assert data["usage"]["total"]["calls"] == 12
    assert data["calls"][4] == {
        "call_id": "e",
        "gold": {"priority": "urgent", "category": "medical", "location": "", "subject_description": ""},
        "triage": None,
        "extract_details": None,
        "review": None,
        "second_opinion": None,  # default prompts: no labelled pool, no second opinion
        "neighbours": None,  # and no neighbours
        "second_reader": None,  # nor a second reader
    }
    # The fake provider's locations ("NNNN Fake Street #crc") are in no transcript: a-d are flagged.
    location = data["calls"][0]["extract_details"]["location"]
    assert data["calls"][0]["review"].startswith(f"location not in the transcript: {location!r}")
    assert data["review"] | {"rate": None} == {
        "n": 5,
        "flagged": 4,
        "wrong_priority": 3,  # b, c, d
        "wrong_priority_flagged": 3,
        "under_triaged": 2,  # b, c
        "under_triaged_flagged": 2,
        "ungrounded_locations": 4,
        "ungrounded_locations_flagged": 4,
        "ungrounded_summaries": 0,  # the fake provider's summaries quote the call
        "ungrounded_summaries_flagged": 0,
        "rate": None,
    }
    assert "| review queue (calls flagged) | 80.0% (4/5) |" in markdown
    assert "| locations not in the transcript (flagged) | 4 (4) |" in markdown
    assert "| summaries naming what the transcript does not (flagged) | 0 (0) |" in markdown
    # No labelled pool in the default programs: the report says the baselines are missing.
    assert "(no labelled pool in the programs: baselines not computed)" in markdown
    assert data["calls"][0]["triage"]["priority"] == "urgent"
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["eval.json", "eval.md"]


def test_urgent_recall_without_urgent_calls_is_reported_as_n_a(provider, tmp_path):
    transcript = transcript_answered("non_urgent")
    path = tmp_path / "calm.jsonl"
    path.write_text(json.dumps(labeled_row("x", transcript, "non_urgent", "noise")) + "\n")
    report = evaluate(fake_settings(provider), path, tmp_path)
    assert report.scores.urgent_recall is None
    assert "| urgent recall | n/a (0/0) |" in report.to_markdown()
    assert "urgent recall n/a" in report.line()


def test_evaluate_uses_the_optimized_programs_in_the_folder(provider, labeled_file, tmp_path):
    program = CallTriager()
    program.triage.predict.demos = [
        dspy.Example(transcript="x", reasoning="r", priority="urgent", category="fire", summary="s")
    ]
    program.save(str(tmp_path / "triager.json"))
    report = evaluate(fake_settings(provider), labeled_file, tmp_path)
    assert report.programs["triage"].startswith(f"{tmp_path / 'triager.json'} (sha256 ")
    assert report.programs["extract_details"].startswith("default prompts")
    assert report.scores.priority_accuracy == pytest.approx(1 / 5)  # the fake answers the same with demos


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"transcript": "x"}\n', "line 1: missing or not text: priority, category, location, subject_description"),
        (
            '{"transcript": "x", "priority": "soon", "category": "fire", "location": "", "subject_description": ""}\n',
            "line 1: priority must be one of urgent, non_urgent, not_an_emergency; got 'soon'",
        ),
        ("\nnot json\n", "line 2: not valid JSON"),
        ("", "holds no calls"),
    ],
)
def test_a_bad_labeled_file_is_an_input_error(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_labeled(path)


def test_labeled_files_in_data_load():
    examples = load_labeled(ROOT / "data" / "dev.jsonl")
    assert len(examples) == 73 and set(examples[0].inputs().keys()) == {"transcript"}
    assert len(load_labeled(ROOT / "data" / "train.jsonl", limit=5)) == 5


def test_cli_evaluate_prints_one_line_and_writes_the_report(provider, labeled_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "evaluate",
            "--input",
            str(labeled_file),
            "--model",
            "openai/fake",
            "--api-base",
            provider.url,
            "--optimized-dir",
            str(tmp_path / "none"),
            "--report",
            str(tmp_path / "r.md"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip().splitlines() == [
        f"5 calls: priority 20.0%, category 40.0%, urgent recall 33.3%, under-triage 2, location 20.0%, "
        f"subject 20.0%; review 80.0% of calls, catching 3/3 wrong priorities and 2/2 under-triaged "
        f"-> {tmp_path / 'r.md'}, {tmp_path / 'r.json'}"
    ]
    assert "| urgent recall | 33.3% (1/3) |" in (tmp_path / "r.md").read_text()


def test_cli_evaluate_missing_file_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--input", "nowhere.jsonl"]) == 2
    assert capsys.readouterr().err == "error: labeled file nowhere.jsonl does not exist\n"
