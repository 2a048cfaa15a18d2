"""Prompt caching: a byte-identical prefix with fixed demos, Anthropic's cache marks, cached tokens counted."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from dspy.lm15 import CacheConfig, Message, Response, TextPart, Usage

from tests.doubles import ScriptedEngine, chat_answer, committed_programs_unbounded, fields_for, scripted_lm
from tests.test_stages import make_batch
from triage.lm import ChatAdapter, LMSetup
from triage.settings import Settings
from triage.stages import ProgramSource, StageConfig, TriageStage

ROOT = Path(__file__).resolve().parents[1]
ANTHROPIC = "anthropic/claude-sonnet-4-6"
ROWS = ["a fire in the kitchen on Elm Street, smoke everywhere", "my cat is stuck in a tree and meowing"]


def requests_for(model: str, demos: str) -> list:
    """The lm15 requests the committed triage program sends for ROWS, with `demos`."""
    settings = Settings(model=model, demos=demos, optimized_dir=committed_programs_unbounded(Path(tempfile.mkdtemp())))
    lm, engine = scripted_lm(lambda request: fields_for("triage"))
    program = ProgramSource.load(settings.optimized_dir, "triager.json")
    stage = TriageStage(StageConfig(settings=settings, program=program), lm_setup=LMSetup(lm, ChatAdapter))
    for transcript in ROWS:
        asyncio.run(stage.answer(transcript))
    return engine.requests


def texts(request) -> list[str]:
    return [message.text or "" for message in request.messages]


def anthropic_payload(request) -> dict:
    """What DSPy's lm15 would send to Anthropic for `request` (built offline, nothing is sent)."""
    from dspy._vendor.lm15.providers.anthropic import AnthropicLM

    return AnthropicLM(api_key="not-used")._payload(request, False)


def marked(payload: dict) -> list[int]:
    return [
        index
        for index, message in enumerate(payload["messages"])
        if any(isinstance(block, dict) and block.get("cache_control") for block in message["content"])
    ]


def demo_messages() -> int:
    """Messages the committed triager's demos take: a user and an assistant message per demo."""
    k = ProgramSource.load(ROOT / "optimized", "triager.json").state["nearest_demos"]["k"]
    assert k >= 1
    return 2 * k


def test_fixed_demos_keep_the_prefix_byte_identical_and_anthropic_caches_it():
    first, second = requests_for(ANTHROPIC, "fixed")
    n = demo_messages()
    assert len(first.messages) == n + 1  # the demos (user, assistant) and the call
    assert first.system == second.system and texts(first)[:n] == texts(second)[:n]  # the same bytes
    assert texts(first)[n] != texts(second)[n] and ROWS[0] in texts(first)[n]
    assert first.config.cache == CacheConfig(prefix_until_index=n - 1)
    payload = anthropic_payload(first)
    assert marked(payload) == [n - 1]  # the last demo: instructions and demos are cached together
    assert payload["system"][0]["cache_control"] == {"type": "ephemeral"}


def test_nearest_demos_differ_per_row_so_only_the_instructions_are_marked():
    first, second = requests_for(ANTHROPIC, "program")
    n = demo_messages()
    assert first.system == second.system and texts(first)[:n] != texts(second)[:n]  # each row its own demos
    assert first.config.cache == CacheConfig(prefix="stable")
    payload = anthropic_payload(first)
    assert marked(payload) == [] and payload["system"][0]["cache_control"] == {"type": "ephemeral"}


def test_no_demos_and_no_marks_where_the_provider_caches_by_itself():
    none = requests_for(ANTHROPIC, "none")
    assert [len(r.messages) for r in none] == [1, 1]
    openai = requests_for("openai/gpt-4.1-mini", "fixed")
    assert all(r.config.cache is None for r in openai)  # OpenAI caches a repeated prefix unasked
    assert texts(openai[0])[: demo_messages()] == texts(openai[1])[: demo_messages()]


class CachingEngine(ScriptedEngine):
    """Reports 8 of each request's 11 prompt tokens as read from the provider's cache."""

    def complete(self, request):
        self.requests.append(request)
        return Response(
            id=None,
            model="scripted",
            message=Message.assistant([TextPart(chat_answer(fields_for("triage")))]),
            finish_reason="stop",
            usage=Usage(input_tokens=11, output_tokens=7, total_tokens=18, cache_read_tokens=8),
        )


def test_cached_prompt_tokens_are_counted_per_row_and_priced_lower():
    import dspy

    from tests.doubles import AsyncScriptedEngine
    from triage.cost import estimated_cost
    from triage.pipeline import Tally

    engine = CachingEngine(lambda request: {})
    lm = dspy.LM("scripted/test", engine=engine, async_engine=AsyncScriptedEngine(engine), cache=False)
    config = StageConfig(settings=Settings(model="scripted/test"), program=ProgramSource(None, "default"))
    stage = TriageStage(config, lm_setup=LMSetup(lm, ChatAdapter))
    batch = asyncio.run(stage(make_batch(["one call", "another call"])))
    rows = batch.to_pylist()
    assert [(r["prompt_tokens"], r["cached_prompt_tokens"]) for r in rows] == [(11, 8), (11, 8)]
    tally = Tally()
    tally.add(batch)
    assert (tally.prompt_tokens, tally.cached_prompt_tokens) == (22, 16)
    model = "anthropic/claude-sonnet-4-6"
    full, cached = estimated_cost(model, 22_000, 14_000), estimated_cost(model, 22_000, 14_000, cached_tokens=16_000)
    assert cached == pytest.approx(full - 16_000 * 3e-6 * 0.9)  # a cached read costs 10% of the input price
