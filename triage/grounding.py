"""Answers that must come from the transcript: checking them, and making a local model unable to do otherwise.

A location that is not in the call sends a responder to the wrong place. Two defences:

* `is_grounded` checks an answer after the fact (any model): every word of a location that
  holds a digit, and most of its other words, must be words of the transcript; a subject
  description may paraphrase more (half of its content words). Measured on the labelled
  train+dev calls: every gold location and 92% of gold subjects pass. A summary is free to
  paraphrase, but the numbers and names in it (`foreign_facts`) must be the call's: the
  embedded model used to write its demo's address and ages into 44% of its summaries.
* `span_grammar` makes the embedded model's answer a span of the transcript by construction:
  a GBNF rule that can start at any word and then only continue with the words that follow
  it, with the transcript's own separators between them (or stay empty). A schema property
  marked with `SPAN_OF` gets this rule instead of a free string.
"""

from __future__ import annotations

import json
import re
import unicodedata

# Marks a string property of a JSON schema whose value must be a span of the given text (of at most
# SPAN_MAX_WORDS words, if given).
SPAN_OF = "x-span-of"
SPAN_MAX_WORDS = "x-span-max-words"

LOCATION_MIN_SHARE = 0.8
SUBJECT_MIN_SHARE = 0.5
# Longest span the grammar allows; the longest gold location in the labelled data has 12 words.
MAX_SPAN_WORDS = 12
GROUNDED_FIELDS: dict[str, float] = {"location": LOCATION_MIN_SHARE, "subject_description": SUBJECT_MIN_SHARE}
# A summary's span: about the 100 characters a free summary had (`triage.local.grammar`); "I'm" is two words.
MAX_SUMMARY_WORDS = 24
# The output fields the embedded model answers with a span of the transcript, and the span's longest.
SPAN_FIELDS: dict[str, int] = {
    "location": MAX_SPAN_WORDS,
    "subject_description": MAX_SPAN_WORDS,
    "summary": MAX_SUMMARY_WORDS,
}

# A word as spans and grounding count them ("I'm" is two).
WORD = re.compile(r"\w+", re.UNICODE)
_ACRONYM = re.compile(r"[A-Z]{2,5}")
_FILLER = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "and",
        "or",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "is",
        "are",
        "was",
        "were",
        "be",
        "it",
        "its",
        "he",
        "she",
        "they",
        "him",
        "her",
        "his",
        "them",
        "their",
        "my",
        "me",
        "i",
        "we",
        "our",
        "you",
        "your",
        "this",
        "that",
        "there",
        "caller",
    ]
)


def _words(text: str) -> list[str]:
    return WORD.findall(unicodedata.normalize("NFKC", text).lower())


def is_grounded(answer: str | None, transcript: str, min_share: float) -> bool:
    """Whether `answer` is taken from `transcript` (case, punctuation and word order aside).

    Empty answers are grounded. Every word with a digit (a house number, an age) must be in the
    transcript; of the other words, leaving out fillers ("the", "of", "caller"), at least
    `min_share` must be.
    """
    words = [w for w in _words(answer or "") if w not in _FILLER and (len(w) > 1 or w.isdigit())]
    if not words:
        return True
    said = set(_words(transcript))
    if any(any(c.isdigit() for c in w) and w not in said for w in words):
        return False
    return sum(w in said for w in words) / len(words) >= min_share


def ungrounded_fields(values: dict[str, str | None], transcript: str) -> list[str]:
    """The names of `GROUNDED_FIELDS` in `values` whose answer is not grounded in `transcript`."""
    return [
        name
        for name, share in GROUNDED_FIELDS.items()
        if name in values and not is_grounded(values[name], transcript, share)
    ]


def foreign_facts(text: str | None, transcript: str) -> list[str]:
    """The numbers and names in `text` that `transcript` does not have (each once, in order).

    A number is a word with a digit; a name, a capitalised word other than the first of a sentence
    (so "A fire in the kitchen" names nothing) and other than an acronym a paraphrase may use
    ("CPR", "EMS"). Case and punctuation aside, as in `is_grounded`.
    """
    said = set(_words(transcript))
    text = unicodedata.normalize("NFKC", text or "")
    found: list[str] = []
    for match in WORD.finditer(text):
        word = match.group()
        before = text[: match.start()].rstrip()
        starts_sentence = not before or before[-1] in ".!?:;"
        is_name = word[0].isupper() and not starts_sentence and not _ACRONYM.fullmatch(word)
        is_fact = any(c.isdigit() for c in word) or is_name
        if is_fact and word.lower() not in said and word not in found:
            found.append(word)
    return found


# ─── Span grammar ────────────────────────────────────────────────────────────────────────────────


def _gbnf_literal(text: str) -> str:
    """A GBNF literal matching `text` as it appears inside a JSON string."""
    inside_json = json.dumps(text, ensure_ascii=False)[1:-1]
    return '"' + inside_json.replace("\\", "\\\\").replace('"', '\\"') + '"'


# A speaker's label at the start of a turn: "Caller: ", "Dispatcher: ", "Interpreter: ", "Call-taker: ".
SPEAKER_LABEL = re.compile(r"(?:^|(?<=[\s\].!?]))([A-Z][\w'-]*(?: [\w'-]+){0,3}):\s")
CALL_TAKERS = frozenset({"dispatcher", "call-taker", "call taker", "operator"})


def callers_turns(text: str) -> list[tuple[int, int]]:
    """The (start, end) character ranges of `text` that are not the call-taker's: what comes before
    the first speaker's label and every turn by another voice (the caller, an interpreter, a voice
    on an open line), labels left out. The whole text when it has no labels or only the call-taker's.

    Every gold location of the labelled train + dev calls is said there (233 of 233), and 144 of the
    149 gold subjects that pass `is_grounded`; the call-taker's words ("911, what's your emergency",
    "You'll want a locksmith") were where the embedded model's worst locations came from on dev.
    """
    labels = list(SPEAKER_LABEL.finditer(text))
    turns = [(0, labels[0].start())] if labels and WORD.search(text, 0, labels[0].start()) else []
    for i, label in enumerate(labels):
        if label.group(1).lower() not in CALL_TAKERS:
            turns.append((label.end(), labels[i + 1].start() if i + 1 < len(labels) else len(text)))
    return turns or [(0, len(text))]


def span_grammar(text: str, rule: str, max_words: int = MAX_SPAN_WORDS) -> list[str]:
    """GBNF rules: `rule` matches a JSON string holding "" or a run of 1 to `max_words` words of one
    of the callers' turns of `text` (`callers_turns`).

    Rule `w{i}-{r}` is word i, then optionally the separator after it and word i+1 of the same turn
    with r-1 words left, so a span starts at any word, keeps the text's own spelling and
    punctuation between words, and stops after any word or at the turn's end. Without the bound a
    model can run on through the whole transcript (seen: a "subject" of 60 words).
    """
    turn_of: dict[int, int] = {}  # word index -> turn index, for the words in a caller's turn
    matches = list(WORD.finditer(text))
    for t, (start, end) in enumerate(callers_turns(text)):
        turn_of |= {i: t for i, m in enumerate(matches) if start <= m.start() and m.end() <= end}
    if not turn_of:
        return [f'{rule} ::= "\\"" "\\"" space']
    lines = [
        f'{rule} ::= "\\"" ( {rule}-start )? "\\"" space',
        f"{rule}-start ::= " + " | ".join(f"{rule}-w{i}-{max_words}" for i in sorted(turn_of)),
    ]
    for i in sorted(turn_of):
        match = matches[i]
        word = _gbnf_literal(match.group())
        last = turn_of.get(i + 1) != turn_of[i]
        separator = "" if last else _gbnf_literal(text[match.end() : matches[i + 1].start()])
        for left in range(1, max_words + 1):
            if last or left == 1:
                lines.append(f"{rule}-w{i}-{left} ::= {word}")
            else:
                lines.append(f"{rule}-w{i}-{left} ::= {word} ( {separator} {rule}-w{i + 1}-{left - 1} )?")
    return lines


def split_span_properties(schema: dict) -> tuple[dict, dict[str, tuple[str, int]]]:
    """`schema` with each `SPAN_OF` property replaced by a placeholder constant, and placeholder ->
    (text, most words: `SPAN_MAX_WORDS` or `MAX_SPAN_WORDS`).

    The placeholders go through the ordinary JSON-schema-to-grammar conversion; `with_span_rules`
    then swaps each one for its span rule.
    """
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not any(isinstance(p, dict) and SPAN_OF in p for p in properties.values()):
        return schema, {}
    spans: dict[str, tuple[str, int]] = {}
    rewritten = dict(properties)
    for index, (name, prop) in enumerate(properties.items()):
        if isinstance(prop, dict) and SPAN_OF in prop:
            placeholder = f"span-placeholder-{index}"
            spans[placeholder] = (str(prop[SPAN_OF]), int(prop.get(SPAN_MAX_WORDS, MAX_SPAN_WORDS)))
            rewritten[name] = {"const": placeholder}
    return {**schema, "properties": rewritten}, spans


def with_span_rules(grammar: str, spans: dict[str, tuple[str, int]]) -> str:
    """`grammar` with each placeholder constant replaced by a span rule of its text."""
    lines = [grammar]
    for index, (placeholder, (text, max_words)) in enumerate(spans.items()):
        literal = f'"\\"{placeholder}\\""'
        if literal not in grammar:
            raise ValueError(f"span placeholder {placeholder} not found in the grammar")
        rule = f"span{index}"
        lines[0] = lines[0].replace(f"{literal} space", rule).replace(literal, rule)
        lines += span_grammar(text, rule, max_words)
    return "\n".join(lines)
