"""The scripts the review queue is tuned with: out-of-fold programs never see the call they answer,
and `tune_review.py` counts the caller's-words reasons from the report's transcripts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from triage.programs import CallTriager

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_out_of_fold_programs_hold_none_of_the_folds_calls(tmp_path):
    out_of_fold = load_script("out_of_fold")
    calls = out_of_fold.read_jsonl(ROOT / "data/dev.jsonl")[:5]
    held_out = {call["call_id"] for call in calls}
    out_of_fold.programs_without(held_out, ROOT / "optimized", tmp_path)
    for name in out_of_fold.PROGRAMS:
        committed = json.loads((ROOT / "optimized" / name).read_text())["nearest_demos"]
        pruned = json.loads((tmp_path / name).read_text())["nearest_demos"]
        assert len(pruned["pool"]) == len(committed["pool"]) - len(held_out)
        assert {entry["call_id"] for entry in pruned["pool"]}.isdisjoint(held_out)
        assert {k: v for k, v in pruned.items() if k != "pool"} == {k: v for k, v in committed.items() if k != "pool"}
    program = CallTriager()
    program.load(tmp_path / "triager.json")
    for call in calls:  # the demo shown and the neighbours are never the call itself
        [(demo, similarity)] = program.nearest.nearest(call["transcript"])
        assert demo["call_id"] not in held_out and similarity < 0.99


def test_tune_review_counts_the_callers_words_from_the_reports_transcripts(tmp_path):
    tune_review = load_script("tune_review")
    calm = "Caller: Nobody's hurt, it happened last night, I just need a case number."
    data = tmp_path / "calls.jsonl"
    row = {"call_id": "c1", "transcript": calm, "priority": "non_urgent", "category": "crime"}
    data.write_text(json.dumps(row | {"location": "", "subject_description": ""}) + "\n")
    call = {
        "call_id": "c1",
        "gold": {"priority": "non_urgent"},
        "triage": {"priority": "urgent"},
        "review": None,
        "second_opinion": {"urgent": 0.6, "non_urgent": 0.4},
        "neighbours": {"urgent": 1.0},
    }
    report = {"data_file": str(data), "calls": [call]}
    with_words = tune_review.with_fixed_reasons(tune_review.with_transcripts(tune_review.calls_of(report), report))
    assert tune_review.score(with_words, 0.7, 0.0, 0.5, 1.01) == (1, 1, 1, 0, 0)  # flagged: "possible over-triage"
    without_words = tune_review.with_fixed_reasons(tune_review.calls_of(report))
    assert tune_review.score(without_words, 0.7, 0.0, 0.5, 1.01) == (0, 1, 0, 0, 0)  # the labelled data agrees


def test_tune_review_keeps_the_recorded_urgent_choice_and_recomputes_the_other_priority_reasons():
    tune_review = load_script("tune_review")
    recorded = [
        "possible under-triage: urgent was one of the labelled calls' choices (non_urgent, urgent), answer non_urgent",
        "possible under-triage: similar labelled calls say urgent (90%), answer non_urgent",
    ]
    call = {
        "call_id": "c1",
        "gold": {"priority": "urgent"},
        "triage": {"priority": "non_urgent"},
        "second_opinion": {"urgent": 0.1, "non_urgent": 0.9},  # what the thresholds read now: no doubt
        "neighbours": {"non_urgent": 1.0},
    }

    def scored(call: dict, reader_p: float = 1.01) -> tuple[int, ...]:
        return tune_review.score(tune_review.with_fixed_reasons([call]), 0.7, 0.0, 0.5, reader_p)

    assert scored(call | {"review": "; ".join(recorded)}) == (1, 1, 1, 1, 1)
    assert scored(call | {"review": recorded[1]}) == (0, 1, 0, 1, 0)  # recomputed
    # The second reader's reason is recomputed from its recorded probabilities, at the threshold tried.
    reader = {"second_reader": {"urgent": 0.5, "non_urgent": 0.3, "not_an_emergency": 0.2}}
    assert scored(call | reader, reader_p=0.45) == (1, 1, 1, 1, 1)
    assert scored(call | reader, reader_p=0.55) == (0, 1, 0, 1, 0)


def test_the_frontier_catches_the_most_wrong_priorities_within_each_share_flagged():
    tune_review = load_script("tune_review")

    def answered_non_urgent(gold: str, urgent_p: float) -> dict:
        return {
            "gold": {"priority": gold},
            "triage": {"priority": "non_urgent"},
            "review": None,
            "second_opinion": {"urgent": urgent_p, "non_urgent": 1 - urgent_p},
        }

    missed, right = answered_non_urgent("urgent", 0.3), answered_non_urgent("non_urgent", 0.2)
    calls = tune_review.with_fixed_reasons([missed, right] + [answered_non_urgent("non_urgent", 0.0)] * 2)
    (_, no_flag, _), (_, one_flag, thresholds) = tune_review.frontier(calls, shares=(0.0, 0.25))
    assert (no_flag[0], no_flag[2]) == (0, 0)
    # One flag allowed: the under-triaged call's 30% is flagged, the right answer's 20% is not.
    assert one_flag == (1, 1, 1, 1, 1)
    assert 0.2 < thresholds[0] <= 0.3
