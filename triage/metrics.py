"""How good a triage is: per-call scores for the optimizers and aggregate scores for reports.

Per call: `triage_metric` and `details_metric` take `(example, prediction, trace=None)` the way
DSPy's optimizers call a metric; `triage_feedback` and `details_feedback` take GEPA's five
arguments and explain the score in words.

Aggregates: `score_calls` turns gold rows and predictions (None for a failed prediction) into
`Scores`: accuracies, urgent recall, under-triage, location/subject match and confusion matrices.
A failed prediction counts as wrong everywhere and never as a hit.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy

from triage.programs import CATEGORIES, PRIORITIES

URGENT = "urgent"
FAILED = "(failed)"
INVALID = "(invalid)"
FUZZY_RATIO = 0.8
# An urgent call predicted as anything else scores 0 for the whole call, whatever else is right:
# sending help late is the costliest error. The other fields share the rest of the score.
PRIORITY_WEIGHT = 0.5
CATEGORY_WEIGHT = 0.5

_ARTICLES = frozenset({"a", "an", "the"})
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def _value(record: Any, name: str) -> Any:
    """A field of an Example, Prediction or dict; None when it is missing (e.g. a failed prediction)."""
    if record is None:
        return None
    if isinstance(record, Mapping):
        return record.get(name)
    try:
        return record.get(name)
    except AttributeError:
        return getattr(record, name, None)


def label(value: Any) -> str | None:
    """A priority or category as compared: stripped, lowercase; None if missing or not text."""
    return value.strip().lower() if isinstance(value, str) else None


def priority_rank(priority: str | None) -> int | None:
    """0 for urgent, 1 non_urgent, 2 not_an_emergency; None for anything else."""
    return PRIORITIES.index(priority) if priority in PRIORITIES else None


def is_under_triage(gold: str | None, predicted: str | None) -> bool:
    """The prediction is a valid priority strictly less urgent than the gold one."""
    gold_rank, predicted_rank = priority_rank(gold), priority_rank(predicted)
    return gold_rank is not None and predicted_rank is not None and predicted_rank > gold_rank


def normalize_text(text: Any) -> str:
    """Lowercase, accents kept, punctuation and whitespace folded to single spaces, articles dropped."""
    if not isinstance(text, str):
        return ""
    words = _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()
    return " ".join(word for word in words if word not in _ARTICLES)


def text_match(gold: Any, predicted: Any) -> bool:
    """Gold and predicted free text name the same thing.

    After `normalize_text`: both empty, or one contained in the other as whole words, or
    difflib's similarity ratio at least `FUZZY_RATIO`. A failed prediction (None) is a miss,
    even against an empty gold value.
    """
    if predicted is None:
        return False
    a, b = normalize_text(gold), normalize_text(predicted)
    if not a or not b:
        return a == b
    if f" {a} " in f" {b} " or f" {b} " in f" {a} ":
        return True
    return difflib.SequenceMatcher(None, a, b).ratio() >= FUZZY_RATIO


# ─── Per-call metrics (what the optimizers maximize) ────────────────────────────────────────────


def triage_metric(example: Any, prediction: Any, trace: Any = None) -> float:
    """Score one CallTriager answer in [0, 1].

    0 when an urgent call is predicted as anything else (under-triage) or the prediction failed;
    otherwise half for the right priority and half for the right category. With a `trace` (DSPy
    is bootstrapping demos) only a fully right answer counts, so no wrong answer becomes a demo.
    """
    gold_priority, predicted_priority = label(_value(example, "priority")), label(_value(prediction, "priority"))
    if gold_priority == URGENT and predicted_priority != URGENT:
        return 0.0
    priority_ok = predicted_priority is not None and predicted_priority == gold_priority
    category = label(_value(prediction, "category"))
    category_ok = category is not None and category == label(_value(example, "category"))
    if trace is not None:
        return float(priority_ok and category_ok)
    return PRIORITY_WEIGHT * priority_ok + CATEGORY_WEIGHT * category_ok


def details_metric(example: Any, prediction: Any, trace: Any = None) -> float:
    """Score one DetailExtractor answer: half for the location, half for the subject (fuzzy matches)."""
    location_ok = text_match(_value(example, "location"), _value(prediction, "location"))
    subject_ok = text_match(_value(example, "subject_description"), _value(prediction, "subject_description"))
    if trace is not None:
        return float(location_ok and subject_ok)
    return 0.5 * location_ok + 0.5 * subject_ok


def triage_feedback(
    gold: Any, pred: Any, trace: Any = None, pred_name: str | None = None, pred_trace: Any = None
) -> dspy.Prediction:
    """`triage_metric` with a sentence saying what was wrong, for GEPA's reflection model."""
    score = triage_metric(gold, pred)
    gold_priority, gold_category = label(_value(gold, "priority")), label(_value(gold, "category"))
    priority, category = label(_value(pred, "priority")), label(_value(pred, "category"))
    notes = []
    if priority is None:
        notes.append("No valid priority was produced.")
    elif gold_priority == URGENT and priority != URGENT:
        notes.append(
            f"UNDER-TRIAGE: this call is urgent but was marked {priority}; a life or safety is at risk now, "
            "and this is the costliest error."
        )
    elif priority != gold_priority:
        notes.append(f"Priority should be {gold_priority}, not {priority}.")
    if category != gold_category:
        notes.append(f"Category should be {gold_category}, not {category}.")
    return dspy.Prediction(score=score, feedback=" ".join(notes) or "Priority and category are both right.")


def details_feedback(
    gold: Any, pred: Any, trace: Any = None, pred_name: str | None = None, pred_trace: Any = None
) -> dspy.Prediction:
    """`details_metric` with a sentence per wrong field, for GEPA's reflection model."""
    notes = []
    for name in ("location", "subject_description"):
        expected, got = _value(gold, name) or "", _value(pred, name)
        if not text_match(expected, got):
            wanted = f"{expected!r}" if expected else "empty (nothing in the call gives it)"
            notes.append(f"`{name}` should be {wanted}; got {got!r}.")
    return dspy.Prediction(score=details_metric(gold, pred), feedback=" ".join(notes) or "Both fields match.")


# ─── Aggregates (what the reports show) ──────────────────────────────────────────────────────────


def confusion_matrix(
    gold: Sequence[str | None], predicted: Sequence[str | None], labels: Sequence[str]
) -> dict[str, dict[str, int]]:
    """gold label -> predicted label -> count. Columns add FAILED (no answer) and INVALID (not a label)."""
    columns = [*labels, INVALID, FAILED]
    matrix = {g: dict.fromkeys(columns, 0) for g in labels}
    for g, p in zip(gold, predicted, strict=True):
        if g not in matrix:
            continue
        column = FAILED if p is None else (p if p in labels else INVALID)
        matrix[g][column] += 1
    return matrix


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


@dataclass
class Scores:
    """Aggregate scores over N calls. A rate is None when it has no denominator (shown as "n/a")."""

    n: int = 0
    triage_failed: int = 0
    details_failed: int = 0
    priority_accuracy: float | None = None
    category_accuracy: float | None = None
    urgent_total: int = 0
    urgent_found: int = 0
    urgent_recall: float | None = None
    under_triage: int = 0
    over_triage: int = 0
    location_match: float | None = None
    subject_match: float | None = None
    triage_score: float | None = None
    details_score: float | None = None
    priority_confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    category_confusion: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_calls(
    gold: Sequence[Any], triage: Sequence[Any | None] | None = None, details: Sequence[Any | None] | None = None
) -> Scores:
    """Aggregate scores of triage and/or detail predictions against gold rows (None = failed prediction).

    Urgent recall: urgent calls predicted urgent / urgent calls (None when there are none; a
    failed prediction is a miss). Under-triage: calls predicted at a valid, less urgent priority
    than the gold one (a failed prediction is counted in `triage_failed`, not here). Over-triage:
    the reverse.
    """
    n = len(gold)
    scores = Scores(n=n)
    if triage is not None:
        gold_priority = [label(_value(g, "priority")) for g in gold]
        gold_category = [label(_value(g, "category")) for g in gold]
        priority = [None if p is None else label(_value(p, "priority")) for p in triage]
        category = [None if p is None else label(_value(p, "category")) for p in triage]
        scores.triage_failed = sum(p is None for p in triage)
        scores.priority_accuracy = _rate(sum(g == p for g, p in zip(gold_priority, priority, strict=True)), n)
        scores.category_accuracy = _rate(sum(g == p for g, p in zip(gold_category, category, strict=True)), n)
        scores.urgent_total = gold_priority.count(URGENT)
        scores.urgent_found = sum(g == p == URGENT for g, p in zip(gold_priority, priority, strict=True))
        scores.urgent_recall = _rate(scores.urgent_found, scores.urgent_total)
        scores.under_triage = sum(is_under_triage(g, p) for g, p in zip(gold_priority, priority, strict=True))
        scores.over_triage = sum(is_under_triage(p, g) for g, p in zip(gold_priority, priority, strict=True))
        scores.triage_score = _rate(sum(triage_metric(g, p) for g, p in zip(gold, triage, strict=True)), n)
        scores.priority_confusion = confusion_matrix(gold_priority, priority, PRIORITIES)
        scores.category_confusion = confusion_matrix(gold_category, category, CATEGORIES)
    if details is not None:
        scores.details_failed = sum(p is None for p in details)
        pairs = list(zip(gold, details, strict=True))
        for name, attribute in (("location", "location_match"), ("subject_description", "subject_match")):
            hits = sum(text_match(_value(g, name), _value(p, name)) for g, p in pairs)
            setattr(scores, attribute, _rate(hits, n))
        scores.details_score = _rate(sum(details_metric(g, p) for g, p in pairs), n)
    return scores


@dataclass
class ReviewScores:
    """How well the review queue points at the answers worth doubting."""

    n: int = 0
    flagged: int = 0
    wrong_priority: int = 0
    wrong_priority_flagged: int = 0
    under_triaged: int = 0
    under_triaged_flagged: int = 0
    ungrounded_locations: int = 0
    ungrounded_locations_flagged: int = 0
    ungrounded_summaries: int = 0  # summaries with a number or name the transcript does not have
    ungrounded_summaries_flagged: int = 0

    @property
    def rate(self) -> float | None:
        return _rate(self.flagged, self.n)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"rate": self.rate}


def score_review(
    gold: Sequence[Any],
    transcripts: Sequence[str],
    triage: Sequence[Any | None],
    details: Sequence[Any | None],
    reviews: Sequence[str | None],
) -> ReviewScores:
    """What the review queue (`reviews`, one per call, None when not flagged) catches.

    A wrong priority is a valid priority that differs from the gold one (a failed prediction is an
    error, reported apart); an under-triaged call is one predicted less urgent than it is. An
    ungrounded location is a non-empty predicted location that `is_grounded` rejects; an ungrounded
    summary, one with a number or name the transcript does not have (`foreign_facts`).
    """
    from triage.grounding import LOCATION_MIN_SHARE, foreign_facts, is_grounded

    scores = ReviewScores(n=len(gold), flagged=sum(bool(r) for r in reviews))
    for g, text, t, d, review in zip(gold, transcripts, triage, details, reviews, strict=True):
        gold_priority, priority = label(_value(g, "priority")), label(_value(t, "priority"))
        if priority in PRIORITIES and priority != gold_priority:
            scores.wrong_priority += 1
            scores.wrong_priority_flagged += bool(review)
        if is_under_triage(gold_priority, priority):
            scores.under_triaged += 1
            scores.under_triaged_flagged += bool(review)
        location = _value(d, "location")
        if location and not is_grounded(location, text, LOCATION_MIN_SHARE):
            scores.ungrounded_locations += 1
            scores.ungrounded_locations_flagged += bool(review)
        if foreign_facts(_value(t, "summary"), text):
            scores.ungrounded_summaries += 1
            scores.ungrounded_summaries_flagged += bool(review)
    return scores


def percent(rate: float | None) -> str:
    """A rate as "83.3%", or "n/a" when it is undefined."""
    return "n/a" if rate is None else f"{100 * rate:.1f}%"
