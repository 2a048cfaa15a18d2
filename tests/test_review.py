"""The review queue: its rules, and the stages filling `review` without ever changing an answer."""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from tests.doubles import fields_for, last_user_text, scripted_lm, transcript_of
from triage.demos import details_demo, nearest_pool, triage_demo
from triage.evaluation import load_labeled
from triage.lm import ChatAdapter, LMSetup
from triage.programs import CallTriager, DetailExtractor
from triage.review import choice_reasons, cue_reasons, join_reasons, priority_reasons, reader_reasons, urgent_first
from triage.schema import WORKING_SCHEMA
from triage.settings import Settings
from triage.stages import ExtractDetailsStage, ProgramSource, StageConfig, TriageStage

TRAIN = "data/train.jsonl"
FIRE = "Caller: The house next door is on fire, flames out of the windows, people screaming inside!"
# A labelled train call (the pool's own label for it is not_an_emergency, about 64% sure).
QUESTION = (
    "Caller: Hi, is Route 50 closed because of the snow? I'm trying to drive to Ocean City tonight. "
    "Dispatcher: Please check the DOT road conditions line or website, sir. This is 911."
)


def test_priority_reasons_put_possible_under_triage_first_and_never_fire_on_agreement():
    leaning_urgent = {"urgent": 0.45, "non_urgent": 0.35, "not_an_emergency": 0.20}
    assert priority_reasons("non_urgent", leaning_urgent) == [
        "possible under-triage: similar labelled calls say urgent (45%), answer non_urgent"
    ]
    leaning_calm = {"urgent": 0.20, "non_urgent": 0.50, "not_an_emergency": 0.30}
    assert priority_reasons("urgent", leaning_calm) == [
        "priority disagrees: similar labelled calls say non_urgent (50%), answer urgent"
    ]
    assert priority_reasons("non_urgent", leaning_calm) == []  # agreement
    # The net: the second opinion agrees, but puts `under_triage_p` or more on the levels above the answer.
    net = {"urgent": 0.34, "non_urgent": 0.30, "not_an_emergency": 0.36}
    assert priority_reasons("not_an_emergency", net, under_triage_p=0.6) == [
        "possible under-triage: similar labelled calls say more urgent (64%), answer not_an_emergency"
    ]
    assert priority_reasons("not_an_emergency", net, under_triage_p=0.7) == []  # 64% is under a 70% net
    assert priority_reasons("urgent", {"urgent": 0.9, "non_urgent": 0.1}) == []
    assert priority_reasons("non_urgent", {}) == []  # no second opinion, no reason


def test_a_priority_most_of_its_nearest_labelled_calls_do_not_back_is_flagged():
    agreeing = {"urgent": 0.5, "non_urgent": 0.3, "not_an_emergency": 0.2}
    split = {"urgent": 0.3, "non_urgent": 0.7}
    assert priority_reasons("urgent", agreeing, split, min_support=0) == []  # 0: the rule is off
    backed = functools.partial(priority_reasons, min_support=0.5)
    assert backed("urgent", agreeing, split) == ["priority weakly backed: 30% of the nearest labelled calls say urgent"]
    assert backed("urgent", agreeing, {"urgent": 0.55, "non_urgent": 0.45}) == []  # enough
    assert backed("urgent", agreeing, {"urgent": 0.45, "non_urgent": 0.55}, min_support=0.4) == []
    assert backed("urgent", {}, split) == ["priority weakly backed: 30% of the nearest labelled calls say urgent"]
    # The neighbours say more urgent than the answer: possible under-triage, first, whatever the classifier says.
    calm = {"urgent": 0.1, "non_urgent": 0.3, "not_an_emergency": 0.6}
    assert backed("non_urgent", calm, {"urgent": 0.7, "non_urgent": 0.3}) == [
        "possible under-triage: the nearest labelled calls say urgent (70%), answer non_urgent",
        "priority disagrees: similar labelled calls say not_an_emergency (60%), answer non_urgent",
    ]
    # One reason of a kind: the classifier's under-triage (or disagreement) already says it.
    leaning_urgent = {"urgent": 0.45, "non_urgent": 0.35, "not_an_emergency": 0.20}
    assert backed("non_urgent", leaning_urgent, {"urgent": 0.7, "non_urgent": 0.3}) == [
        "possible under-triage: similar labelled calls say urgent (45%), answer non_urgent"
    ]
    leaning_calm = {"urgent": 0.20, "non_urgent": 0.50, "not_an_emergency": 0.30}
    assert backed("urgent", leaning_calm, split) == [
        "priority disagrees: similar labelled calls say non_urgent (50%), answer urgent"
    ]


def test_a_second_reader_that_answers_otherwise_with_enough_confidence_is_a_reason():
    sure_urgent = {"urgent": 0.6, "non_urgent": 0.3, "not_an_emergency": 0.1}
    assert reader_reasons("non_urgent", sure_urgent, min_p=0.45) == [
        "possible under-triage: a second reader (sentence embeddings) says urgent (60%), answer non_urgent"
    ]
    calmer = {"urgent": 0.2, "non_urgent": 0.5, "not_an_emergency": 0.3}
    assert reader_reasons("not_an_emergency", calmer, min_p=0.45) == [
        "possible under-triage: a second reader (sentence embeddings) says non_urgent (50%), answer not_an_emergency"
    ]
    assert reader_reasons("urgent", {"urgent": 0.3, "non_urgent": 0.2, "not_an_emergency": 0.5}, min_p=0.45) == [
        "priority disagrees: a second reader (sentence embeddings) says not_an_emergency (50%), answer urgent"
    ]
    assert reader_reasons("non_urgent", sure_urgent, min_p=0.65) == []  # not sure enough
    assert reader_reasons("urgent", sure_urgent) == []  # agreement
    assert reader_reasons("urgent", {}) == []  # no reader (a program without sentence embeddings)


def test_the_callers_words_flag_a_priority_they_contradict():
    assert cue_reasons("non_urgent", FIRE) == [
        "possible under-triage: the caller says 'on fire', 'flames', answer non_urgent"
    ]
    assert cue_reasons("urgent", FIRE) == []
    gone = "Dispatcher: Is anyone hurt? Caller: No, nobody's hurt, he left an hour ago, I need a case number."
    assert cue_reasons("urgent", gone) == [
        "possible over-triage: the caller says 'nobody's hurt', 'an hour ago', answer urgent"
    ]
    assert cue_reasons("non_urgent", gone) == []
    # Danger outweighs calm: "not hurt" beside a gun is no reason to doubt an urgent answer.
    assert cue_reasons("urgent", "Caller: I'm not hurt but he still has the gun, he's in the kitchen.") == []
    assert cue_reasons("urgent", QUESTION) == []  # no phrase either way: no word from here
    # A cancellation doubts any answer but not_an_emergency.
    cancelled = "Caller: It turned out to be a guy with a barbecue smoker. Sorry! You can cancel."
    assert cue_reasons("non_urgent", cancelled) == [
        "possible over-triage: the caller says 'you can cancel', answer non_urgent"
    ]
    assert cue_reasons("not_an_emergency", cancelled) == []


def test_an_answer_below_urgent_when_urgent_was_a_choice_is_possible_under_triage():
    [reason] = choice_reasons("non_urgent", {"priority": ("non_urgent", "urgent"), "category": ("noise",)})
    assert reason == (
        "possible under-triage: urgent was one of the labelled calls' choices (non_urgent, urgent), answer non_urgent"
    )
    assert choice_reasons("not_an_emergency", {"priority": ("urgent", "not_an_emergency")})
    assert choice_reasons("urgent", {"priority": ("non_urgent", "urgent")}) == []  # it took urgent
    assert choice_reasons("non_urgent", {"priority": ("non_urgent", "not_an_emergency")}) == []  # urgent was no choice
    assert choice_reasons("non_urgent", {}) == []  # no bound


def test_urgent_first_moves_possible_under_triage_ahead_and_keeps_the_rest_in_order():
    reasons = ["b", "possible under-triage: x", "a", "possible under-triage: y"]
    assert urgent_first(reasons) == ["possible under-triage: x", "possible under-triage: y", "b", "a"]


def test_join_reasons_keeps_order_and_is_null_when_empty():
    assert join_reasons(None, []) is None
    assert join_reasons("transcript cut", ["a", "b"], None) == "transcript cut; a; b"


def batch(transcripts: list[str], review: list[str | None] | None = None) -> pa.Table:
    n = len(transcripts)
    columns = {name: [None] * n for name in WORKING_SCHEMA.names}
    columns |= {
        "call_id": [f"c{i}" for i in range(n)],
        "transcript": transcripts,
        "review": review or [None] * n,
        "model": ["m"] * n,
        "prompt_tokens": [0] * n,
        "completion_tokens": [0] * n,
        "triaged_at": [datetime(2020, 1, 1, tzinfo=UTC)] * n,
    }
    return pa.table(columns, schema=WORKING_SCHEMA)


def stage_with(stage_class, script, state=None, **settings):
    lm, engine = scripted_lm(script)
    config = StageConfig(
        settings=Settings(model="scripted/test", **settings), program=ProgramSource(state, "test"), in_flight=4
    )
    return stage_class(config, lm_setup=LMSetup(lm, ChatAdapter)), engine


@pytest.fixture(scope="module")
def nearest_triager_state() -> dict:
    program = CallTriager()
    program.nearest.load_state({"k": 2, "pool": nearest_pool(load_labeled(TRAIN), triage_demo)})
    return program.dump_state()


def test_triage_stage_flags_a_priority_its_second_opinion_doubts_and_keeps_the_answer(nearest_triager_state):
    def script(request):  # the LM calls the fire calm and the question urgent
        calm = "on fire" in transcript_of(request)
        return fields_for("triage", priority="non_urgent" if calm else "urgent", category="other")

    stage, engine = stage_with(TriageStage, script, nearest_triager_state)
    rows = asyncio.run(
        stage(batch([FIRE, QUESTION], review=["transcript cut to 90 of 120 characters", None]))
    ).to_pylist()
    assert [r["priority"] for r in rows] == ["non_urgent", "urgent"]  # never changed
    fire_review, question_review = rows[0]["review"], rows[1]["review"]
    assert fire_review.startswith("transcript cut to 90 of 120 characters; possible under-triage: ")
    assert fire_review.endswith("answer non_urgent")
    assert question_review.startswith("priority disagrees: similar labelled calls say not_an_emergency")
    # The caller's words first, then what the labelled calls say: two independent reasons.
    assert fire_review.split("; ")[1] == "possible under-triage: the caller says 'on fire', 'flames', answer non_urgent"
    assert fire_review.split("; ")[2].startswith("possible under-triage: similar labelled calls say urgent (")
    neighbours = stage.evidence(FIRE)["neighbours"]  # the shares the weak-backing rule reads
    assert max(neighbours, key=neighbours.__getitem__) == "urgent" and sum(neighbours.values()) == pytest.approx(1.0)
    # The prompt showed the two most similar labelled calls, not fixed demos.
    fire_prompt = next(last_user_text(r) for r in engine.requests if "on fire" in transcript_of(r))
    assert fire_prompt.count("[[ ## transcript ## ]]") == 1  # the demos are earlier messages
    assert sum("[[ ## transcript ## ]]" in m.text for r in engine.requests[:1] for m in r.messages if m.text) == 3


def test_a_validation_retry_is_a_reason_to_review():
    answers = iter([fields_for("triage", priority="very urgent"), fields_for("triage", priority="urgent")])
    stage, _ = stage_with(TriageStage, lambda request: next(answers))
    [row] = asyncio.run(stage(batch([FIRE]))).to_pylist()
    assert row["priority"] == "urgent"
    assert row["review"] == "answered on attempt 2 (earlier answers did not validate)"


def test_details_stage_flags_a_location_that_is_not_in_the_transcript():
    def script(request):
        copied = "on fire" in transcript_of(request)
        location = "the factory on Canal Street" if copied else ""
        return fields_for("extract_details", location=location, subject_description="")

    stage, _ = stage_with(ExtractDetailsStage, script)
    rows = asyncio.run(stage(batch([FIRE, QUESTION]))).to_pylist()
    assert rows[0]["location"] == "the factory on Canal Street"  # kept as answered, and flagged
    assert rows[0]["review"] == "location not in the transcript: 'the factory on Canal Street'"
    assert rows[1]["review"] is None


def test_triage_stage_flags_a_summary_naming_what_the_call_does_not():
    def script(request):
        copied = "on fire" in transcript_of(request)
        summary = "Fire at 12 Abbott Road, Brenda Collier inside." if copied else "Asks whether Route 50 is closed."
        return fields_for("triage", summary=summary)

    stage, _ = stage_with(TriageStage, script)
    rows = asyncio.run(stage(batch([FIRE, QUESTION]))).to_pylist()
    assert rows[0]["summary"] == "Fire at 12 Abbott Road, Brenda Collier inside."  # kept as answered, and flagged
    assert rows[0]["review"] == "summary names what the transcript does not: '12', 'Abbott', 'Road', 'Brenda'"
    assert rows[1]["review"] is None  # "Route 50" is the caller's


def test_a_label_outside_the_bound_is_kept_in_one_request_and_reviewed(nearest_triager_state):
    """A hosted model is not held to the bound by a grammar: its other valid label is an answer, not an error."""
    bounded = {**nearest_triager_state}
    bounded["nearest_demos"] = {**bounded["nearest_demos"], "choices": 5, "choice_share": 0.4}
    stage, engine = stage_with(TriageStage, lambda request: fields_for("triage", priority="non_urgent"), bounded)
    choices = stage.program.nearest.neighbourhood(FIRE).choices
    assert choices["priority"] == ("urgent",)  # the fire's neighbours leave it no other priority
    [row] = asyncio.run(stage(batch([FIRE]))).to_pylist()
    assert row["priority"] == "non_urgent" and row["errors"] is None  # kept as answered
    assert len(engine.requests) == 1  # not asked again
    assert "priority non_urgent is outside the labelled calls' choices (urgent)" in row["review"]
    assert row["review"].startswith("possible under-triage: ")  # still the most serious reason first


def test_triage_stage_flags_a_calmer_answer_when_the_bound_left_urgent(nearest_triager_state):
    """urgent stays a choice on a smaller share than the other labels; the model's other pick is reviewed."""
    bounded = {**nearest_triager_state}
    bounded["nearest_demos"] = {**bounded["nearest_demos"], "choices": 5, "choice_share": 1.0, "urgent_share": 0.0}
    party = "Caller: The party next door is so loud, music all night, I cannot sleep."
    stage, _ = stage_with(TriageStage, lambda request: fields_for("triage", priority="non_urgent"), bounded)
    assert stage.program.nearest.neighbourhood(party).choices["priority"] == ("non_urgent", "urgent")
    [row] = asyncio.run(stage(batch([party]))).to_pylist()
    assert row["priority"] == "non_urgent"  # kept as answered
    first = row["review"].split("; ")[0]
    assert first == "possible under-triage: urgent was one of the labelled calls' choices (non_urgent, urgent), " + (
        "answer non_urgent"
    )


def test_a_location_given_where_the_bound_leaves_none_is_kept_and_reviewed():
    """A hosted model is not held to an empty location by a grammar: its place is kept and reviewed."""
    program = DetailExtractor()
    program.nearest.load_state({"k": 1, "location_below": 0.5, "pool": nearest_pool(load_labeled(TRAIN), details_demo)})

    def script(request):  # the LM names a place for both calls; only the question's was bounded to none
        place = "Route 50" if "Route 50" in transcript_of(request) else "next door"
        return fields_for("extract_details", location=place, subject_description="")

    stage, _ = stage_with(ExtractDetailsStage, script, program.dump_state())
    assert stage.program.nearest.neighbourhood(QUESTION).choices == {"location": ("",)}
    assert stage.program.nearest.neighbourhood(FIRE).choices == {}
    question, fire = asyncio.run(stage(batch([QUESTION, FIRE]))).to_pylist()
    assert question["location"] == "Route 50"  # kept as answered
    assert question["review"] == "location 'Route 50' given where the labelled calls say the caller names none"
    assert fire["location"] == "next door" and fire["review"] is None
