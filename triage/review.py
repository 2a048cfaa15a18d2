"""The review queue: why a human should look at a call's answers. Answers are never changed here.

Each stage adds its reasons to the row's `review` column (null when there are none), joined by
"; ", the most serious first:

1. "possible under-triage: urgent was one of the labelled calls' choices ..." the program's
   bound left urgent to the model (`NearestDemos.urgent_share`) and it answered another priority.
   "possible under-triage: the caller says ..." a non-urgent answer to a call whose caller
   describes present danger ("not breathing", "gun": `triage.cues`), and "possible under-triage:
   similar labelled calls say ..." the second opinion (a classifier on the labelled calls,
   `triage.retrieval.SecondOpinion`) would answer a more urgent level than the LM, or gives
   the levels more urgent than the LM's answer at least `UNDER_TRIAGE_P` together; or most
   of the `NEIGHBOURS` most similar labelled calls (by similarity) say a more urgent level.
   "possible under-triage: a second reader (sentence embeddings) says ..." a classifier on the
   labelled calls' sentence embeddings alone (`NearestDemos.reader_probabilities`, for a program
   that reads them) gives a more urgent level at least `READER_P`.
2. "possible over-triage: the caller says ..." an urgent answer to a call whose caller says
   nobody is hurt or in danger, or that it is over ("last night", "long gone"), or any answer
   but not_an_emergency to a caller who calls off an earlier call ("you can cancel that"), when
   the caller describes no danger (`triage.cues`: words, not labelled data, so it catches errors
   the next two share with the model).
   "priority disagrees: ..." the second opinion would answer a less urgent level (with at
   least `DISAGREE_P` confidence; 0: whenever it would), or the second reader would with at
   least `READER_P`. The reader errs elsewhere than TF-IDF (it reads meaning, not words), so it
   doubts answers the classifier-bounded program and its second opinion agree on.
3. "priority weakly backed: ..." less than `MIN_SUPPORT` of the similarity of the `NEIGHBOURS`
   most similar labelled calls is on calls with the LM's priority. The classifier and the
   LM's bounded answer share many errors (both read the same labelled calls); the neighbours'
   split shows where the labelled data itself is divided. (`MIN_SUPPORT` 0 turns it off.)
4. "priority X is outside the labelled calls' choices (...)" (or category), "location '...' given
   where the labelled calls say the caller names none": the program bounded the answer for this
   call (`NearestDemos` choices) and the model answered another valid one. The embedded model
   cannot (its grammar holds it to the bound); a hosted one can, and its answer is kept rather
   than failed.
5. "answered on attempt N": earlier answers did not validate.
6. "location not in the transcript: ..." / "subject not in the transcript: ..." / "summary names what
   the transcript does not: ..." (a number or name; `triage.grounding`).
7. "transcript cut ...": the reader shortened an overlong transcript (set by the reader).

The thresholds were chosen on every train + dev call answered out of fold (`scripts/out_of_fold.py`,
then `scripts/tune_review.py` on its report) and checked on dev (`optimized/report.json`): the
fewest calls flagged while catching every under-triaged call and 70% of the wrong priorities on
both. With the committed programs (priority bounded by the classifier, so the second opinion
agrees with the answer; the second reader and the caller's words do the doubting, and the
neighbours' rule is off): out of fold 17.2% flagged, catching 21 of 28 wrong priorities and 3 of
3 under-triaged calls; dev 17.8%, 5 of 7 (no under-triaged call). What was tried, and the figures
on test: docs/quality.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from triage.cues import calm_phrases, cancelling_phrases, danger_phrases
from triage.grounding import foreign_facts, ungrounded_fields
from triage.programs import PRIORITIES

UNDER_TRIAGE_P = 0.6
DISAGREE_P = 0.0
NEIGHBOURS = 7
MIN_SUPPORT = 0.0
READER_P = 0.6
_FIELD_NAMES = {"location": "location", "subject_description": "subject"}


def priority_reasons(
    priority: str,
    opinion: dict[str, float],
    neighbours: dict[str, float] | None = None,
    *,
    under_triage_p: float = UNDER_TRIAGE_P,
    disagree_p: float = DISAGREE_P,
    min_support: float = MIN_SUPPORT,
) -> list[str]:
    """Reasons to doubt the LM's `priority`, given the second opinion's probabilities and the
    neighbours' shares (level -> share of the most similar labelled calls' summed similarity).

    Under-triage: the probability the second opinion gives to every level more urgent than the
    answer, summed (for `non_urgent`, that of `urgent`; for `not_an_emergency`, both others).
    At most one reason of each kind; possible under-triage first.
    """
    if priority not in PRIORITIES:
        return []
    more_urgent = PRIORITIES[: PRIORITIES.index(priority)]
    reasons = _classifier_reasons(priority, opinion, more_urgent, under_triage_p, disagree_p) if opinion else []
    support = neighbours.get(priority, 0.0) if neighbours else 1.0
    if support < min_support:
        said = max(neighbours, key=neighbours.__getitem__)
        if said in more_urgent and not any(r.startswith(UNDER_TRIAGE) for r in reasons):
            reasons.insert(
                0, f"{UNDER_TRIAGE}: the nearest labelled calls say {said} ({neighbours[said]:.0%}), answer {priority}"
            )
        elif not reasons:
            reasons.append(f"priority weakly backed: {support:.0%} of the nearest labelled calls say {priority}")
    return reasons


UNDER_TRIAGE = "possible under-triage"


def cue_reasons(priority: str, transcript: str) -> list[str]:
    """Reasons to doubt the LM's `priority` from the caller's own words (`triage.cues`)."""
    if priority not in PRIORITIES:
        return []
    danger = danger_phrases(transcript)
    if danger:
        return [f"{UNDER_TRIAGE}: the caller says {_quoted(danger)}, answer {priority}"] if priority != "urgent" else []
    calming: list[str] = []
    if priority != "not_an_emergency":
        calming = cancelling_phrases(transcript)
    if priority == "urgent" and not calming:
        calming = calm_phrases(transcript)
    return [f"{OVER_TRIAGE}: the caller says {_quoted(calming)}, answer {priority}"] if calming else []


def reader_reasons(priority: str, reader: dict[str, float], *, min_p: float = READER_P) -> list[str]:
    """A reason when the second reader (a classifier on sentence embeddings alone) would answer
    another priority with at least `min_p` confidence: possible under-triage if more urgent."""
    if priority not in PRIORITIES or not reader:
        return []
    said = max(reader, key=reader.__getitem__)
    if said == priority or reader[said] < min_p:
        return []
    kind = UNDER_TRIAGE if PRIORITIES.index(said) < PRIORITIES.index(priority) else PRIORITY_DISAGREES
    return [f"{kind}: {READER_SAYS} {said} ({reader[said]:.0%}), answer {priority}"]


PRIORITY_DISAGREES = "priority disagrees"  # the classifier or the second reader says a calmer level
READER_SAYS = "a second reader (sentence embeddings) says"


def urgent_first(reasons: Sequence[str]) -> list[str]:
    """The reasons, possible under-triage first (otherwise in the order given)."""
    return sorted(reasons, key=lambda reason: not reason.startswith(UNDER_TRIAGE))


OVER_TRIAGE = "possible over-triage"
QUOTED_PHRASES = 2


def _quoted(phrases: Sequence[str], most: int = QUOTED_PHRASES) -> str:
    return ", ".join(f"'{phrase}'" for phrase in phrases[:most])


def _classifier_reasons(
    priority: str, opinion: dict[str, float], more_urgent: tuple[str, ...], under_triage_p: float, disagree_p: float
) -> list[str]:
    p_higher = sum(opinion.get(level, 0.0) for level in more_urgent)
    best = max(opinion, key=opinion.__getitem__)
    if best in more_urgent:
        return [f"{UNDER_TRIAGE}: similar labelled calls say {best} ({opinion[best]:.0%}), answer {priority}"]
    if more_urgent and p_higher >= under_triage_p:
        said = more_urgent[0] if len(more_urgent) == 1 else "more urgent"
        return [f"{UNDER_TRIAGE}: similar labelled calls say {said} ({p_higher:.0%}), answer {priority}"]
    if best != priority and opinion[best] >= disagree_p:
        return [f"{PRIORITY_DISAGREES}: similar labelled calls say {best} ({opinion[best]:.0%}), answer {priority}"]
    return []


def choice_reasons(priority: str, choices: dict[str, tuple[str, ...]]) -> list[str]:
    """Possible under-triage when the program left urgent as a choice for this call and the model
    answered another priority: the bound keeps urgent on weaker evidence than the other labels
    (`NearestDemos.urgent_share`), so a human decides the calls where the model did not take it."""
    allowed = choices.get("priority", ())
    if priority in PRIORITIES and priority != "urgent" and "urgent" in allowed:
        return [f"{UNDER_TRIAGE}: {URGENT_WAS_A_CHOICE} ({', '.join(allowed)}), answer {priority}"]
    return []


URGENT_WAS_A_CHOICE = "urgent was one of the labelled calls' choices"


def bound_reasons(values: dict[str, str | None], choices: dict[str, tuple[str, ...]]) -> list[str]:
    """One reason per field answered outside the choices the program left it for this call (a
    location given where the program's bound left it empty, too)."""
    return [
        f"{_FIELD_NAMES.get(name, name)} {values[name]!r} given where the labelled calls say the caller names none"
        if allowed == ("",)
        else f"{name} {values[name]} is outside the labelled calls' choices ({', '.join(allowed)})"
        for name, allowed in choices.items()
        if values.get(name) is not None and values[name] not in allowed
    ]


def attempts_reason(attempts: int) -> list[str]:
    return [f"answered on attempt {attempts} (earlier answers did not validate)"] if attempts > 1 else []


def grounding_reasons(values: dict[str, str | None], transcript: str) -> list[str]:
    """One reason per grounded field whose answer is not taken from the transcript, and one for a
    summary that names numbers or names the transcript does not have."""
    reasons = [
        f"{_FIELD_NAMES[name]} not in the transcript: {values[name]!r}"
        for name in ungrounded_fields(values, transcript)
    ]
    if facts := foreign_facts(values.get("summary"), transcript):
        reasons.append(f"summary names what the transcript does not: {_quoted(facts, QUOTED_FACTS)}")
    return reasons


QUOTED_FACTS = 4


def join_reasons(*parts: str | Sequence[str] | None) -> str | None:
    """Reasons (or errors) as one column value: "; "-joined in order, None when there are none."""
    reasons: list[str] = []
    for part in parts:
        reasons.extend([part] if isinstance(part, str) else part or ())
    return "; ".join(reason for reason in reasons if reason) or None
