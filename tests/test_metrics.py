"""Metric functions: per-call scores for the optimizers, aggregates and their edge cases."""

from __future__ import annotations

import inspect

import dspy
import pytest

from triage.metrics import (
    FAILED,
    details_feedback,
    details_metric,
    normalize_text,
    percent,
    score_calls,
    score_review,
    text_match,
    triage_feedback,
    triage_metric,
)


def gold(priority: str = "urgent", category: str = "fire", location: str = "", subject: str = "") -> dspy.Example:
    return dspy.Example(
        transcript="t", priority=priority, category=category, location=location, subject_description=subject
    ).with_inputs("transcript")


def pred(priority: str = "urgent", category: str = "fire", **details: str) -> dspy.Prediction:
    return dspy.Prediction(priority=priority, category=category, summary="s", **details)


def test_normalize_folds_case_punctuation_whitespace_and_articles():
    assert normalize_text("  The Pool, at the MARRIOTT -- on  Airport Blvd. ") == "pool at marriott on airport blvd"
    assert normalize_text("An old man; a dog") == "old man dog"
    assert normalize_text("la calle Roosevelt número 418") == "la calle roosevelt número 418"
    assert normalize_text(None) == ""


@pytest.mark.parametrize(
    ("gold_text", "predicted", "expected"),
    [
        ("", "", True),  # nothing to find, nothing found
        ("", "  . ", True),  # punctuation only is empty
        ("", "123 Main St", False),
        ("123 Main St", "", False),
        ("123 Main St", None, False),  # a failed prediction never matches
        ("", None, False),
        ("the pool at the Marriott", "Pool at Marriott!", True),  # normalized equal
        ("Miller's Pond", "Miller's Pond, behind the middle school", True),  # containment, whole words
        ("apartment 5C, 18 West 73rd", "apartment 5c 18 west 73rd street", True),
        ("18 West 73rd Street", "18 West 73rd Stret", True),  # fuzzy ratio >= 0.8
        ("5", "15 Elm Street", False),  # containment is by whole words, not characters
        ("60 Sutton Place", "the karaoke party", False),
    ],
)
def test_text_match(gold_text, predicted, expected):
    assert text_match(gold_text, predicted) is expected


def test_triage_metric_weights_under_triage_to_zero():
    assert triage_metric(gold("urgent", "fire"), pred("urgent", "fire")) == 1.0
    assert triage_metric(gold("urgent", "fire"), pred("urgent", "crime")) == 0.5
    # An urgent call marked anything else scores nothing, even with the right category.
    assert triage_metric(gold("urgent", "fire"), pred("non_urgent", "fire")) == 0.0
    assert triage_metric(gold("urgent", "fire"), pred("not_an_emergency", "fire")) == 0.0
    # Over-triage and other priority errors only lose the priority half.
    assert triage_metric(gold("non_urgent", "noise"), pred("urgent", "noise")) == 0.5
    assert triage_metric(gold("non_urgent", "noise"), pred("not_an_emergency", "noise")) == 0.5
    assert triage_metric(gold("non_urgent", "noise"), pred(" Non_Urgent ", "NOISE")) == 1.0


def test_triage_metric_failed_prediction_scores_zero():
    assert triage_metric(gold("urgent"), None) == 0.0
    assert triage_metric(gold("non_urgent", "noise"), dspy.Prediction()) == 0.0
    assert triage_metric(gold("non_urgent", "noise"), {"priority": None, "category": None}) == 0.0


def test_with_a_trace_only_a_fully_right_answer_counts():
    assert triage_metric(gold("urgent", "fire"), pred("urgent", "crime"), trace=[]) == 0.0
    assert triage_metric(gold("urgent", "fire"), pred("urgent", "fire"), trace=[]) == 1.0
    g = gold(location="12 Elm St", subject="a man in red")
    assert details_metric(g, pred(location="12 Elm Street", subject_description="man in red"), trace=[]) == 1.0
    assert details_metric(g, pred(location="12 Elm Street", subject_description="woman"), trace=[]) == 0.0


def test_details_metric_halves():
    g = gold(location="12 Elm St", subject="")
    assert details_metric(g, pred(location="12 elm st.", subject_description="")) == 1.0
    assert details_metric(g, pred(location="12 elm st.", subject_description="a cat")) == 0.5
    assert details_metric(g, pred(location="", subject_description="")) == 0.5
    assert details_metric(g, None) == 0.0


def test_feedback_metrics_take_gepas_five_arguments_and_explain():
    for metric in (triage_feedback, details_feedback):
        inspect.signature(metric).bind(None, None, None, None, None)  # what dspy.GEPA checks
    result = triage_feedback(gold("urgent", "fire"), pred("non_urgent", "crime"), None, "triage.predict", None)
    assert result.score == 0.0
    assert "UNDER-TRIAGE" in result.feedback and "Category should be fire, not crime." in result.feedback
    assert triage_feedback(gold(), pred(), None, None, None).feedback == "Priority and category are both right."
    details = details_feedback(gold(location="12 Elm St"), pred(location="", subject_description=""), None, None, None)
    assert details.score == 0.5 and details.feedback == "`location` should be '12 Elm St'; got ''."


def test_scores_with_no_urgent_calls_have_no_urgent_recall():
    golds = [gold("non_urgent", "noise"), gold("not_an_emergency", "other")]
    scores = score_calls(golds, [pred("non_urgent", "noise"), pred("urgent", "other")])
    assert scores.urgent_total == 0 and scores.urgent_recall is None
    assert percent(scores.urgent_recall) == "n/a"
    assert scores.priority_accuracy == 0.5 and scores.category_accuracy == 1.0
    assert scores.under_triage == 0 and scores.over_triage == 1


def test_scores_when_every_urgent_call_is_missed():
    golds = [gold("urgent", "fire"), gold("urgent", "medical"), gold("non_urgent", "noise")]
    scores = score_calls(
        golds, [pred("non_urgent", "fire"), pred("not_an_emergency", "medical"), pred("non_urgent", "noise")]
    )
    assert (scores.urgent_found, scores.urgent_total, scores.urgent_recall) == (0, 2, 0.0)
    assert scores.under_triage == 2 and scores.over_triage == 0
    assert scores.priority_accuracy == pytest.approx(1 / 3)
    assert scores.triage_score == pytest.approx(1 / 3)  # only the non-urgent call scores, fully
    assert scores.priority_confusion["urgent"] == {
        "urgent": 0,
        "non_urgent": 1,
        "not_an_emergency": 1,
        "(invalid)": 0,
        FAILED: 0,
    }


def test_a_failed_prediction_is_a_miss_not_an_under_triage():
    golds = [gold("urgent", "fire"), gold("urgent", "crime")]
    scores = score_calls(golds, [None, pred("urgent", "crime")], [None, pred(location="", subject_description="")])
    assert scores.triage_failed == 1 and scores.details_failed == 1
    assert (scores.urgent_found, scores.urgent_total, scores.urgent_recall) == (1, 2, 0.5)
    assert scores.under_triage == 0
    assert scores.priority_accuracy == 0.5 and scores.category_accuracy == 0.5
    assert scores.location_match == 0.5 and scores.subject_match == 0.5  # the failed one misses even "" == ""
    assert scores.priority_confusion["urgent"][FAILED] == 1
    assert scores.category_confusion["fire"][FAILED] == 1


def test_an_answer_outside_the_label_set_is_invalid_and_wrong():
    scores = score_calls([gold("urgent", "fire")], [pred("very urgent", "blaze")])
    assert scores.priority_accuracy == 0.0 and scores.urgent_recall == 0.0
    assert scores.priority_confusion["urgent"]["(invalid)"] == 1
    assert scores.category_confusion["fire"]["(invalid)"] == 1


def test_percent():
    assert percent(None) == "n/a"
    assert percent(1 / 3) == "33.3%"
    assert percent(1.0) == "100.0%"


def test_score_review_counts_what_the_queue_catches_and_answers_not_in_the_call():
    transcript = "Caller: Smoke at 48 Elm Street, my dad is inside."
    calls = [  # (gold, triage, details, review)
        (
            gold("urgent"),
            {"priority": "non_urgent", "summary": "Smoke at 48 Elm Street."},
            {"location": "48 Elm Street"},
            "x",
        ),
        (
            gold("non_urgent"),
            {"priority": "urgent", "summary": "Smoke at 12 Abbott Road."},
            {"location": "1 Canal St"},
            None,
        ),
        (gold("urgent"), {"priority": "urgent", "summary": "Dad inside, Brenda too."}, None, "y"),
        (gold("urgent"), None, None, None),  # a failed prediction: no answer to score
    ]
    scores = score_review(
        [c[0] for c in calls],
        [transcript] * len(calls),
        [c[1] for c in calls],
        [c[2] for c in calls],
        [c[3] for c in calls],
    )
    assert (scores.n, scores.flagged, scores.wrong_priority, scores.wrong_priority_flagged) == (4, 2, 2, 1)
    assert (scores.under_triaged, scores.under_triaged_flagged) == (1, 1)
    assert (scores.ungrounded_locations, scores.ungrounded_locations_flagged) == (1, 0)
    assert (scores.ungrounded_summaries, scores.ungrounded_summaries_flagged) == (2, 1)  # "12 Abbott Road", "Brenda"
