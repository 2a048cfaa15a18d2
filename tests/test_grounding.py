"""Grounded answers: the check any model's answer gets, and the span grammar the embedded model decodes under."""

from __future__ import annotations

import json
import re

import dspy
import pytest

from triage.grounding import (
    LOCATION_MIN_SHARE,
    MAX_SUMMARY_WORDS,
    SPAN_MAX_WORDS,
    SPAN_OF,
    SUBJECT_MIN_SHARE,
    callers_turns,
    foreign_facts,
    is_grounded,
    span_grammar,
    split_span_properties,
    ungrounded_fields,
    with_span_rules,
)
from triage.lm import GrammarJSONAdapter
from triage.local import make_local_lm
from triage.local.grammar import schema_to_grammar
from triage.programs import CallTriager, ExtractDetails, with_choices

TRANSCRIPT = (
    'Caller: There\'s smoke at 48 Sparrow Hill Lane, the "blue house"!\n'
    "Dispatcher: Anyone inside? Caller: My dad, he's 80, he uses a walker."
)


@pytest.mark.parametrize(
    ("answer", "share", "grounded"),
    [
        ("48 Sparrow Hill Lane", LOCATION_MIN_SHARE, True),
        ("48 SPARROW HILL LANE.", LOCATION_MIN_SHARE, True),  # case and punctuation aside
        ("the blue house, 48 Sparrow Hill", LOCATION_MIN_SHARE, True),  # word order aside
        ("", LOCATION_MIN_SHARE, True),
        ("the factory on Canal Street", LOCATION_MIN_SHARE, False),  # copied from a demo
        ("84 Sparrow Hill Lane", LOCATION_MIN_SHARE, False),  # a house number not said
        ("48 Sparrow Hill Road", LOCATION_MIN_SHARE, False),  # 3 of 4 words < 80%
        ("caller's dad, 80, uses a walker", SUBJECT_MIN_SHARE, True),
        ("caller's dad, 80, in a wheelchair", SUBJECT_MIN_SHARE, True),  # 2 of 3 content words said
        ("a woman in a wheelchair", SUBJECT_MIN_SHARE, False),  # none said
        ("caller's dad, 81, uses a walker", SUBJECT_MIN_SHARE, False),  # an age not said
    ],
)
def test_is_grounded(answer, share, grounded):
    assert is_grounded(answer, TRANSCRIPT, share) is grounded


def test_ungrounded_fields_names_only_the_fields_not_in_the_transcript():
    values = {"location": "12 Canal Street", "subject_description": "caller's dad, 80", "reasoning": "made up"}
    assert ungrounded_fields(values, TRANSCRIPT) == ["location"]
    assert ungrounded_fields({"location": None}, TRANSCRIPT) == []


def span_regex(text: str, max_words: int) -> set[str]:
    """Every value `span_grammar` accepts: "" and each run of 1 to max_words whole words, as written."""
    words = list(re.finditer(r"\w+", text))
    spans = {""}
    for i in range(len(words)):
        for j in range(i, min(i + max_words, len(words))):
            spans.add(text[words[i].start() : words[j].end()])
    return spans


def test_span_grammar_has_one_start_per_word_and_keeps_the_texts_separators():
    text = 'He said "stop", at 5 Elm St.\nOK'
    rules = dict(line.split(" ::= ", 1) for line in span_grammar(text, "s", max_words=3))
    assert rules["s"] == '"\\"" ( s-start )? "\\"" space'
    assert rules["s-start"] == " | ".join(f"s-w{i}-3" for i in range(8))
    assert rules["s-w1-3"] == '"said" ( " \\\\\\"" s-w2-2 )?'  # the quote, JSON-escaped inside a GBNF literal
    assert rules["s-w6-2"] == '"St" ( ".\\\\n" s-w7-1 )?'  # a newline, JSON-escaped
    assert rules["s-w2-1"] == '"stop"'  # no words left: the span ends here
    assert rules["s-w7-3"] == '"OK"'  # the last word ends every span
    assert span_grammar("...", "s") == ['s ::= "\\"" "\\"" space']  # no words: only ""


@pytest.mark.parametrize(
    ("text", "turns"),
    [
        ("Dispatcher: 911? Caller: Fire at 5 Elm! Dispatcher: Anyone inside? Caller: No.", ["Fire at 5 Elm! ", "No."]),
        ("[open line] Call-taker: Hello? Woman: stop, you're hurting me", ["[open line] ", "stop, you're hurting me"]),
        ("Caller: Hi. Interpreter: She says her father fell.", ["Hi. ", "She says her father fell."]),
        ("no labels at all", ["no labels at all"]),
        ("Dispatcher: 911? Dispatcher: Hello?", ["Dispatcher: 911? Dispatcher: Hello?"]),  # only the call-taker
    ],
)
def test_callers_turns_leave_out_the_call_takers_words_and_the_labels(text, turns):
    assert [text[start:end] for start, end in callers_turns(text)] == turns


def test_a_span_stays_inside_one_of_the_callers_turns():
    text = "Dispatcher: 911, what's the address? Caller: 5 Elm St. Dispatcher: Elm what? Caller: Elm Street"
    allowed = {""}
    for start, end in callers_turns(text):
        allowed |= span_regex(text[start:end], 3)
    assert allowed == {
        *("", "5", "Elm", "St", "Street"),
        *("5 Elm", "Elm St", "5 Elm St", "Elm Street"),
    }
    rules = dict(line.split(" ::= ", 1) for line in span_grammar(text, "s", max_words=3))
    words = re.findall(r"\w+", text)
    starts = rules["s-start"].split(" | ")
    assert [words[int(alt.split("-")[1][1:])] for alt in starts] == ["5", "Elm", "St", "Elm", "Street"]
    assert rules["s-w9-3"] == '"St"'  # the turn ends: no way on into "Dispatcher: Elm what?"
    assert "s-w0-3" not in rules and "s-w12-3" not in rules  # the call-taker's words have no rule


def test_span_properties_become_span_rules_in_the_schemas_grammar():
    schema = {
        "type": "object",
        "properties": {
            "reasoning": {"type": "string"},
            "location": {"type": "string", SPAN_OF: "at 5 Elm St"},
            "summary": {"type": "string", SPAN_OF: "a b c d", SPAN_MAX_WORDS: 2},
        },
        "required": ["reasoning", "location", "summary"],
        "additionalProperties": False,
    }
    rewritten, spans = split_span_properties(schema)
    assert rewritten["properties"]["location"] == {"const": "span-placeholder-1"}
    assert spans == {"span-placeholder-1": ("at 5 Elm St", 12), "span-placeholder-2": ("a b c d", 2)}
    grammar = with_span_rules(schema_to_grammar(rewritten), spans)
    assert "location ::= span0" in grammar.splitlines()
    assert "summary ::= span1" in grammar.splitlines()
    assert 'span1-w0-2 ::= "a" ( " " span1-w1-1 )?' in grammar.splitlines()  # at most 2 words
    assert "span1-w0-3" not in grammar
    assert "span-placeholder" not in grammar
    assert split_span_properties({"type": "string"}) == ({"type": "string"}, {})


@pytest.mark.parametrize(
    ("summary", "facts"),
    [
        ("Smoke at 48 Sparrow Hill Lane, dad inside with a walker.", []),
        ("smoke at the blue house. Dad, 80, inside", []),  # sentence starts and said numbers pass
        ("A fire with no one described.", []),  # the first word of a sentence is no name
        ("Smoke at 12 Abbott Road (the caller's dad, 80).", ["12", "Abbott", "Road"]),  # a demo's address
        ("Dad, 81, and Brenda Collier inside", ["81", "Brenda", "Collier"]),
        ("Dad inside; caller told to start CPR, EMS and FD sent", []),  # acronyms a paraphrase uses
        ("Kids: 12, 14, 16, 14", ["12", "14", "16"]),  # each once
        ("", []),
        (None, []),
    ],
)
def test_foreign_facts_are_the_numbers_and_names_the_call_does_not_have(summary, facts):
    assert foreign_facts(summary, TRANSCRIPT) == facts


@pytest.fixture(scope="module")
def local_lm() -> dspy.LM:
    lm = make_local_lm(cache=False, max_string_chars=60, field_max_chars={"reasoning": 60})
    yield lm
    lm.engine.close()


@pytest.mark.slow
def test_the_embedded_model_cannot_copy_a_demos_address(local_lm):
    """A demo whose address is not in the call: the model's location and subject are still spans of the call."""
    extract = dspy.ChainOfThought(ExtractDetails)
    demo = dspy.Example(
        transcript="Caller: Fire at the factory on Canal Street! Two workers are inside.",
        reasoning="The location and the person are quoted from the call.",
        location="the factory on Canal Street",
        subject_description="two workers inside",
    )
    transcripts = [
        TRANSCRIPT,
        "Caller: Someone broke into my car last night on Route 9, near the diner. Nothing else.",
        "Caller: Hello? Help!",
    ]
    with dspy.context(lm=local_lm, adapter=GrammarJSONAdapter()):
        for transcript in transcripts:
            answer = extract(transcript=transcript, demos=[demo])
            raw = json.loads(local_lm.engine.runtime.last_generation.text)
            for name in ("location", "subject_description"):
                allowed = span_regex(transcript, 12)
                assert raw[name] in allowed, (name, raw[name])
                assert answer[name] == raw[name]


@pytest.mark.slow
def test_a_location_the_program_bounds_to_empty_is_empty_and_the_subject_still_a_span(local_lm):
    """`NearestDemos.location_below`: the grammar holds a bounded location to "" (a free span otherwise)."""
    transcript = "Caller: Sorry, wrong number. My little boy was playing with the phone."
    extract = dspy.ChainOfThought(ExtractDetails)
    with dspy.context(lm=local_lm, adapter=GrammarJSONAdapter()):
        narrowed = with_choices(extract.predict.signature, (("location", ("",)),))
        bounded = extract(transcript=transcript, signature=narrowed)
        raw = json.loads(local_lm.engine.runtime.last_generation.text)
        assert raw["location"] == bounded.location == ""
        assert raw["subject_description"] in span_regex(transcript, 12)
        free = extract(transcript=transcript)
        assert free.location in span_regex(transcript, 12)


@pytest.mark.slow
def test_the_embedded_models_summary_is_a_span_of_the_call(local_lm):
    """A triage demo whose summary names a place and a person not in the call: the model's summary
    is still a span of the call (at most MAX_SUMMARY_WORDS words), so it cannot carry them over."""
    triager = CallTriager()
    demo = dspy.Example(
        transcript="Caller: Fire at the factory on Canal Street! Two workers are inside.",
        reasoning="Category: fire.",
        priority="urgent",
        category="fire",
        summary="Brenda Collier and two workers trapped at the factory on Canal Street, 1450",
    )
    transcripts = [TRANSCRIPT, "Caller: Someone broke into my car last night on Route 9, near the diner. Nothing else."]
    with dspy.context(lm=local_lm, adapter=GrammarJSONAdapter()):
        for transcript in transcripts:
            answer = triager.triage(transcript=transcript, demos=[demo])
            raw = json.loads(local_lm.engine.runtime.last_generation.text)
            assert raw["summary"] in span_regex(transcript, MAX_SUMMARY_WORDS), raw["summary"]
            assert answer.summary == raw["summary"]
            assert foreign_facts(answer.summary, transcript) == []
