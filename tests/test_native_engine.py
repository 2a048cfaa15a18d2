"""The stages' LM for a hosted model: DSPy's native client with its route resolved once.

It must send what plain `dspy.LM` sends, raise the errors the stage's retry relies on,
and step aside for anything DSPy would not send natively.
"""

from __future__ import annotations

import asyncio
import json

import dspy
import pytest
from dspy.utils.exceptions import LMRateLimitError, is_retryable_lm_error

from tests.fake_provider import FakeProvider, expected_answer
from triage.lm import ChatAdapter, build_lm
from triage.native_engine import RoutedAsyncEngine, build_native_lm
from triage.programs import CallTriager
from triage.settings import resolve_settings

TRANSCRIPT = "Caller: my neighbour's garage at 12 Oak Lane is on fire, flames on the roof."


def _settings(url: str, **flags):
    return resolve_settings({"model": "openai/fake", "api_base": url, "cache": False, **flags}, dotenv_path=None)


async def _triage(lm: dspy.BaseLM, transcript: str = TRANSCRIPT) -> dspy.Prediction:
    with dspy.context(lm=lm, adapter=ChatAdapter()):
        return await CallTriager().acall(transcript=transcript)


def test_hosted_model_gets_the_routed_engine_and_sends_what_plain_dspy_sends():
    bodies: list[dict] = []

    def record(body: dict) -> None:
        bodies.append(body)

    with FakeProvider(handler=record, api_key="sk-test-123") as fp:
        routed = build_lm(_settings(fp.url, api_key="sk-test-123")).lm
        plain = dspy.LM("openai/fake", api_base=fp.url, api_key="sk-test-123", cache=False, num_retries=0)
        assert isinstance(routed._async_engine_spec, RoutedAsyncEngine)
        first = asyncio.run(_triage(routed))
        second = asyncio.run(_triage(plain))
        stats = fp.stats()

    expected = expected_answer(TRANSCRIPT)
    for prediction in (first, second):
        assert (prediction.priority, prediction.category) == (expected["priority"], expected["category"])
    assert stats["outcomes"]["ok"] == 2 and stats["outcomes"]["401"] == 0  # the key reached the server both ways
    assert json.dumps(bodies[0], sort_keys=True) == json.dumps(bodies[1], sort_keys=True)


def test_routed_engine_raises_what_the_stage_retries_on():
    with FakeProvider(rate_429=1.0, retry_after=3) as fp:
        lm = build_lm(_settings(fp.url)).lm
        with pytest.raises(LMRateLimitError) as caught:
            asyncio.run(_triage(lm))
    assert caught.value.retry_after == pytest.approx(3.0)
    assert is_retryable_lm_error(caught.value)

    with FakeProvider(rate_500=1.0) as fp:
        lm = build_lm(_settings(fp.url)).lm
        with pytest.raises(Exception) as caught:
            asyncio.run(_triage(lm))
    assert is_retryable_lm_error(caught.value)


def test_one_client_per_event_loop():
    with FakeProvider() as fp:
        lm = build_lm(_settings(fp.url)).lm
        for _ in range(3):  # each asyncio.run is a new loop; a client bound to a closed loop would fail
            assert asyncio.run(_triage(lm)).priority == expected_answer(TRANSCRIPT)["priority"]


def test_models_dspy_would_not_send_natively_get_plain_dspy(monkeypatch):
    # A model name lm15 has no route for goes through LiteLLM in DSPy: left to DSPy.
    plain = build_native_lm("cohere/command-r", cache=False, num_retries=0, client_kwargs={"api_key": "k"})
    assert plain.engine == "auto" and plain._async_engine_spec is None
    # DSPy's legacy gateway variable sends openai/... elsewhere: left to DSPy too.
    monkeypatch.setenv("OPENAI_API_BASE", "http://127.0.0.1:9/v1")
    gateway = build_native_lm("openai/gpt-4.1-mini", cache=False, num_retries=0, client_kwargs={"api_key": "k"})
    assert gateway.engine == "auto"


def test_anthropic_and_openai_models_are_routed_without_any_network_at_construction():
    for model in ("anthropic/claude-sonnet-4-5", "openai/gpt-4.1-mini"):
        lm = build_native_lm(model, cache=False, num_retries=0, client_kwargs={"api_key": "sk-SECRET-1"})
        assert isinstance(lm._async_engine_spec, RoutedAsyncEngine)
        assert "sk-SECRET-1" not in repr(vars(lm)) + repr(vars(lm._async_engine_spec))
