"""The memoized model-metadata lookup answers exactly what DSPy's own does, as independent copies."""

from __future__ import annotations

import dspy.clients.capabilities as capabilities
import dspy.clients.costs as costs
import dspy.clients.model_metadata as model_metadata

from triage import dspy_speedups


def test_memoized_lookup_matches_the_original_and_hands_out_copies():
    dspy_speedups.install()
    dspy_speedups.install()  # idempotent
    memoized = model_metadata.model_info
    assert costs.model_info is memoized and capabilities.model_info is memoized
    unwrapped = memoized.__wrapped__  # DSPy's own function
    assert unwrapped is not memoized
    known = [("openai", "gpt-4.1-mini"), ("openai", "no-such-model"), ("anthropic", "claude-sonnet-4-5")]
    for provider, model in known:
        assert memoized(provider, model) == unwrapped(provider, model)
    first = memoized("openai", "gpt-4.1-mini")
    assert first.get("input_cost_per_token") is not None
    first["input_cost_per_token"] = -1.0  # a caller's change must not leak into the cache
    assert memoized("openai", "gpt-4.1-mini")["input_cost_per_token"] > 0
    assert memoized("openai", "gpt-4.1-mini", namespaces=()) == unwrapped("openai", "gpt-4.1-mini", namespaces=())
