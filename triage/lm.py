"""Which language model and which adapter a run uses, built from Settings.

Hosted models go through DSPy's own HTTP client. Their transient errors are retried in
one place only, the stage's retry loop, so DSPy's `num_retries` is 0 there: the two would
otherwise multiply. The optimizer, which calls the LM directly, keeps DSPy's retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dspy

from triage.settings import Settings

NO_KEY = "no-key"


@dataclass(frozen=True)
class LMSetup:
    """An LM and the adapter class that formats prompts for it."""

    lm: dspy.BaseLM
    adapter_class: type[dspy.ChatAdapter]

    def adapter(self, feedback: str | None = None) -> dspy.ChatAdapter:
        """An adapter; with `feedback`, one that appends it to the request (validation retries)."""
        return self.adapter_class(feedback=feedback)


class _FeedbackMixin:
    """Appends a note about the previous, rejected answer to the last user message.

    The note changes the request, so DSPy's cache does not hand back the rejected answer.
    """

    def __init__(self, *args: Any, feedback: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.feedback = feedback

    def format(self, signature: Any, demos: list[dict[str, Any]], inputs: dict[str, Any]) -> list[dict[str, Any]]:
        messages = super().format(signature, demos, inputs)
        if self.feedback:
            messages[-1] = {**messages[-1], "content": f"{messages[-1]['content']}\n\n{self.feedback}"}
        return messages


class ChatAdapter(_FeedbackMixin, dspy.ChatAdapter):
    """DSPy's chat format, without its silent second call through JSONAdapter on a parse failure:
    the stage's validation retry is the one place a bad answer is asked again."""

    def __init__(self, feedback: str | None = None) -> None:
        super().__init__(feedback=feedback, use_json_adapter_fallback=False)


class JSONAdapter(_FeedbackMixin, dspy.JSONAdapter):
    """JSON answers; the embedded model decodes under a grammar built from this schema."""

    def __init__(self, feedback: str | None = None) -> None:
        super().__init__(feedback=feedback)


def build_lm(settings: Settings, *, num_retries: int = 0, threads: int | None = None) -> LMSetup:
    """The LM named by `settings.model`; `local/...` is the embedded model, anything else DSPy's client."""
    from triage import dspy_speedups
    from triage.local_model import is_local_model, make_local_lm

    dspy_speedups.install()
    if is_local_model(settings.model):
        return LMSetup(make_local_lm(settings.model, threads=threads, cache=settings.cache), JSONAdapter)
    kwargs: dict[str, Any] = {"timeout": settings.timeout}
    if settings.api_base:
        kwargs["api_base"] = settings.api_base
    if settings.api_key is not None:
        kwargs["api_key"] = settings.api_key.reveal()
    elif settings.api_base:
        kwargs["api_key"] = NO_KEY  # self-hosted servers (vLLM, llama.cpp) often need none; DSPy insists on one
    lm = dspy.LM(settings.model, cache=settings.cache, num_retries=num_retries, **kwargs)
    return LMSetup(lm, ChatAdapter)
