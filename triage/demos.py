"""Demos written from labelled calls: what the programs are shown, and how they are chosen.

The gold labels have no `reasoning` or `summary`, but the programs' ChainOfThought answers do: a
labelled demo without them would be shown with "Not supplied for this particular example", which a
small model copies into its answers. So demos get a short reasoning and summary written from their
gold labels by a template (`triage_demo`, `details_demo`); a triage demo's summary is the caller's
own opening words (`caller_summary`), the kind of span of its transcript the embedded model may answer.

Two ways to choose them:
  * `nearest_pool`: every labelled call becomes a pool entry; each call is then shown its k most
    similar entries (`triage.nearest_demos.NearestDemos`). The default optimizer.
  * `select_covering`: one fixed set that shows every label evenly (`--optimizer labeled`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import dspy

from triage.grounding import MAX_SUMMARY_WORDS, WORD, callers_turns

# Demo transcripts longer than this are skipped when choosing labeled demos: every demo is re-read
# in every prompt, and the embedded model's prompt time grows with it.
MAX_DEMO_WORDS = 90

_NOBODY = {
    "crime": "a crime with no one described",
    "medical": "a medical matter with no one described",
    "fire": "a fire matter with no one described",
    "animal": "an animal matter",
    "noise": "a noise complaint",
    "other": "a matter with no one at risk",
}
DETAILS_REASONING = "The location and the person are quoted from the call."


def triage_demo(example: dspy.Example) -> dspy.Example:
    """A complete CallTriager demo: the reasoning templated from the gold labels, the summary the
    caller's opening words (`caller_summary`).

    The reasoning names what the call is about and its category, and nothing about the priority:
    the embedded model copies a demo's reasoning, and a copied "so it is non_urgent" decided the
    priority of every later call (urgent recall fell to 0 in a trial with 12 demos). A summary
    written from the gold subject and location was copied too: the demo's names, ages and address
    came out in 44% of the summaries out of fold.
    """
    about = example.subject_description.strip() or _NOBODY[example.category]
    return dspy.Example(
        transcript=example.transcript,
        reasoning=f"The call is about {about}; category {example.category}.",
        priority=example.priority,
        category=example.category,
        summary=caller_summary(example.transcript),
    ).with_inputs("transcript")


_OPENERS = frozenset(
    ["hi", "hello", "hey", "yeah", "yes", "yep", "um", "uh", "oh", "okay", "ok", "so", "well", "please"]
)
MIN_SUMMARY_WORDS = 6  # a turn shorter than this ("Yes.", "Hello?") says too little


def caller_summary(transcript: str, max_words: int = MAX_SUMMARY_WORDS) -> str:
    """The caller's opening words: a span of `transcript` of at most `max_words` words.

    The first of `callers_turns` with at least `MIN_SUMMARY_WORDS` words (or else the first),
    without its greeting ("Hi, yeah, ..."); a longer one is cut at its last sentence end within
    `max_words` words, or at a later comma when the sentence ends in the first half. Words as
    `triage.grounding.span_grammar` counts them, so it is a span the grammar allows.
    """
    turns = callers_turns(transcript)
    start, end = next(((s, e) for s, e in turns if len(WORD.findall(transcript[s:e])) >= MIN_SUMMARY_WORDS), turns[0])
    words = list(WORD.finditer(transcript, start, end))
    while len(words) > MIN_SUMMARY_WORDS and words[0].group().lower() in _OPENERS:
        words.pop(0)
    if not words:
        return ""
    last = min(len(words), max_words) - 1
    if len(words) > max_words:
        sentence = _last_break(transcript, words[:max_words], ".!?") or 0
        clause = _last_break(transcript, words[:max_words], ",;") or 0
        last = sentence if sentence >= max_words // 2 else max(sentence, clause) or last
    return transcript[words[0].start() : words[last].end()]


def _last_break(text: str, words: list[re.Match[str]], marks: str) -> int | None:
    """The index of the last word (from the `MIN_SUMMARY_WORDS`-th) followed by one of `marks`."""
    for i in range(len(words) - 1, MIN_SUMMARY_WORDS - 2, -1):
        if text[words[i].end() : words[i].end() + 1] in tuple(marks):
            return i
    return None


def details_demo(example: dspy.Example) -> dspy.Example:
    """A complete DetailExtractor demo with a fixed one-line reasoning.

    A reasoning that spelled out the demo's own location and subject was copied into the answers
    ("The incident is at 7 Beacon Street..."); a fixed line is copied harmlessly and is short.
    """
    return dspy.Example(
        transcript=example.transcript,
        reasoning=DETAILS_REASONING,
        location=example.location,
        subject_description=example.subject_description,
    ).with_inputs("transcript")


def triage_features(example: dspy.Example) -> set[Hashable]:
    return {("priority", example.priority), ("category", example.category)}


def details_features(example: dspy.Example) -> set[Hashable]:
    return {
        ("location", bool(example.location)),
        ("subject", bool(example.subject_description)),
        ("category", example.category),
    }


def is_urgent(example: dspy.Example) -> bool:
    return example.priority == "urgent"


def select_covering(
    examples: Sequence[dspy.Example],
    features: Callable[[dspy.Example], set[Hashable]],
    k: int,
    seed: int = 0,
    max_words: int = MAX_DEMO_WORDS,
    last: Callable[[dspy.Example], bool] | None = None,
) -> list[dspy.Example]:
    """k examples that show every feature value, as evenly as possible.

    Greedy: each pick adds the most values not shown yet, then the values shown least so far;
    ties go to a seeded shuffle, so the choice is reproducible. Transcripts over `max_words` words
    are used only if too few are shorter. With `last`, the last chosen example it accepts is moved
    to the end: a small model leans toward the answer of the demo it read last.
    """
    short = [e for e in examples if len(e.transcript.split()) <= max_words]
    pool = list(short if len(short) >= k else examples)
    random.Random(seed).shuffle(pool)
    chosen: list[dspy.Example] = []
    counts: Counter[Hashable] = Counter()

    def gain(example: dspy.Example) -> tuple[int, int]:
        values = features(example)
        return sum(counts[v] == 0 for v in values), -sum(counts[v] for v in values)

    while pool and len(chosen) < k:
        pick = pool.pop(max(range(len(pool)), key=lambda i: gain(pool[i])))
        chosen.append(pick)
        counts.update(features(pick))
    if last is not None:
        accepted = [i for i, e in enumerate(chosen) if last(e)]
        if accepted:
            chosen.append(chosen.pop(accepted[-1]))
    return chosen


def brief_reasoning(demo: dspy.Example) -> str:
    """The one-line reasoning of a nearest demo: its category, or for details where the answer comes from.

    Short on purpose: the embedded model writes a reasoning as long as the demos' (measured: about
    60 of its 120 generated tokens per call with `triage_demo`'s), and every token of it costs time.
    """
    return f"Category: {demo.category}." if "category" in demo else "Quoted from the call."


def nearest_pool(
    examples: Sequence[dspy.Example], demo: Callable[[dspy.Example], dspy.Example]
) -> list[dict[str, Any]]:
    """Every labelled call as a complete demo (with `brief_reasoning`), its call_id and gold labels.

    The gold priority and category of every entry are kept for the second opinion, details demos included.
    """
    pool = []
    for example in examples:
        written = demo(example)
        entry = written.toDict() | {"reasoning": brief_reasoning(written)}
        for name in ("call_id", "priority", "category"):
            if name in example:
                entry[name] = example[name]
        pool.append(entry)
    return pool
