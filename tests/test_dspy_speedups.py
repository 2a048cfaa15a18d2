"""The memoized model-metadata lookup answers exactly what DSPy's own does, as independent copies."""

from __future__ import annotations

import dspy.clients.capabilities as capabilities
import dspy.clients.costs as costs
import dspy.clients.model_metadata as model_metadata

from triage import dspy_speedups


def test_another_dspy_version_runs_plain_dspy(monkeypatch):
    import dspy
    import dspy.adapters.utils as adapter_utils

    def original(provider, model, *, namespaces=None):
        return {}

    monkeypatch.setattr(dspy, "__version__", "3.5.0")
    monkeypatch.setattr(dspy_speedups, "_installed", False)
    for module in (model_metadata, costs, capabilities):
        monkeypatch.setattr(module, "model_info", original)
    type_adapter = adapter_utils.TypeAdapter
    assert dspy_speedups.install() is False
    assert all(m.model_info is original for m in (model_metadata, costs, capabilities))
    assert adapter_utils.TypeAdapter is type_adapter


def test_memoized_lookup_matches_the_original_and_hands_out_copies():
    assert dspy_speedups.install() is True
    assert dspy_speedups.install() is True  # idempotent
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


def test_cached_demo_messages_match_dspys_and_follow_edits():
    """The adapters format a program's demos once; the messages are DSPy's own, and a changed demo is re-formatted."""
    import dspy

    from triage.lm import ChatAdapter, GrammarJSONAdapter, JSONAdapter
    from triage.programs import CallTriager

    signature = CallTriager().predictors()[0].signature
    demos = [
        dspy.Example(
            transcript=f"Caller {i}: smoke on Elm St",
            reasoning="r",
            priority="urgent",
            category="fire",
            summary=f"Smoke {i}.",
        ).with_inputs("transcript")
        for i in range(3)
    ]
    for ours, theirs in ((ChatAdapter, dspy.ChatAdapter), (JSONAdapter, dspy.JSONAdapter)):
        expected = theirs().format_demos(signature, demos)
        first = ours().format_demos(signature, demos)
        assert first == expected
        first[0]["content"] = "changed by a caller"  # callers get copies: the cache is untouched
        assert ours().format_demos(signature, demos) == expected
    demos[1]["summary"] = "Edited in place."
    again = ChatAdapter().format_demos(signature, demos)
    assert again == dspy.ChatAdapter().format_demos(signature, demos)
    assert any("Edited in place." in m["content"] for m in again)
    grammar = GrammarJSONAdapter().format_demos(signature, demos)  # its own compact format, cached apart
    assert grammar != again and any("Edited in place." in m["content"] for m in grammar)
