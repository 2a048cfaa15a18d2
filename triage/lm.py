"""Which language model and which adapter a run uses, built from Settings.

Hosted models go through DSPy's own HTTP client, routed once per LM (`triage.native_engine`).
Their transient errors are retried in one place only, the stage's retry loop, so DSPy's
`num_retries` is 0 there: the two would otherwise multiply. The optimizer, which calls the
LM directly, keeps DSPy's retries.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import json
import textwrap
from dataclasses import dataclass
from typing import Any

import dspy
import pydantic

from triage.grounding import SPAN_FIELDS, SPAN_MAX_WORDS, SPAN_OF
from triage.programs import literal_choices, unbound
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


@functools.lru_cache(maxsize=256)
def _system_message(adapter_class: type[dspy.Adapter], signature: type[dspy.Signature]) -> str:
    return super(_SystemMessageOnce, adapter_class()).format_system_message(signature)


class _SystemMessageOnce:
    """Formats a signature's system message once per adapter class, not on every call.

    DSPy rebuilds it from the signature for each request (its field descriptions and
    structure); it depends on nothing else, and the adapters here take no options
    that would change it. Measured: about 3% of a stage's CPU per call.
    """

    def format_system_message(self, signature: type[dspy.Signature]) -> str:
        return _system_message(type(self), signature)


@functools.lru_cache(maxsize=256)
def _demo_messages(
    adapter_class: type[dspy.Adapter], signature: type[dspy.Signature], demo_values: tuple[tuple[Any, ...], ...]
) -> list[dict[str, Any]]:
    demos = [dict(values) for values in demo_values]
    return super(_DemosFormattedOnce, adapter_class()).format_demos(signature, demos)


class _DemosFormattedOnce:
    """Formats a program's few-shot demos into messages once, not on every call.

    An optimized program carries its demos (six per module here) and DSPy turns each into a
    user and an assistant message on every request (py-spy: ~10% of a stage actor's event
    loop; the CPU per call it saves measured about 3%, inside run-to-run spread). The
    messages depend only on the adapter class, the signature and the demos' values,
    which together are the cache key (the values, not the objects, so a demo edited in place
    is formatted anew). Demos with values that cannot be hashed are formatted every time.
    """

    def format_demos(self, signature: type[dspy.Signature], demos: list[Any]) -> list[dict[str, Any]]:
        try:
            messages = _demo_messages(type(self), signature, tuple(tuple(demo.items()) for demo in demos))
        except (TypeError, AttributeError):  # unhashable values, or demos that are not mappings
            return super().format_demos(signature, demos)
        return [dict(message) for message in messages]  # copies: callers may edit them


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


class _AnyValidLabel:
    """Parses an answer against the signature's full label sets, not the per-call bound
    (`triage.programs.with_choices`): a label outside the bound is kept, and reviewed."""

    def parse(self, signature: type[dspy.Signature], completion: str) -> dict[str, Any]:
        return super().parse(unbound(signature), completion)


class ChatAdapter(_SystemMessageOnce, _DemosFormattedOnce, _FeedbackMixin, _AnyValidLabel, dspy.ChatAdapter):
    """DSPy's chat format, without its silent second call through JSONAdapter on a parse failure:
    the stage's validation retry is the one place a bad answer is asked again."""

    def __init__(self, feedback: str | None = None) -> None:
        super().__init__(feedback=feedback, use_json_adapter_fallback=False)


class JSONAdapter(_SystemMessageOnce, _DemosFormattedOnce, _FeedbackMixin, _AnyValidLabel, dspy.JSONAdapter):
    """JSON answers, in DSPy's own wording."""

    def __init__(self, feedback: str | None = None) -> None:
        super().__init__(feedback=feedback)


class GrammarJSONAdapter(JSONAdapter):
    """DSPy's JSON adapter with a short prompt, for a model whose output a grammar constrains.

    The embedded model decodes under a grammar built from the signature's JSON schema, so it
    cannot get the format wrong, and the ~300 tokens DSPy spends describing the format buy
    nothing. They cost a lot: on this CPU a 135M model generates about half as fast at
    position 600 as at position 200. The system message is the signature's instructions and
    one line per output field; the user message is the inputs alone; demos are compact JSON.
    Parsing, the response schema and demos work as in `dspy.JSONAdapter`, so optimizers can
    compile programs through it.

    The system message lists every label even when the program bounds a call's labels
    (`triage.programs.with_choices`): the grammar, built from the bounded schema, holds the
    model to the bound, and a system message that is the same bytes for every call stays in the
    model's KV cache (measured: ~45 fewer prompt tokens read per triage call, 2.91 -> 2.70 s warm,
    `scripts/bench_local_model.py --threads 1 --programs optimized --input data/calls.jsonl --rows 6`).
    """

    def format_system_message(self, signature: type[dspy.Signature]) -> str:
        signature = unbound(signature)
        lines = [textwrap.dedent(signature.instructions).strip(), "", "Answer in JSON with these fields:"]
        for name, field in signature.output_fields.items():
            choices = literal_choices(field.annotation) or ()
            description = (field.json_schema_extra or {}).get("desc") or ""
            if description.startswith("${"):  # DSPy's placeholder for an undescribed field
                description = ""
            kind = f"one of {', '.join(choices)}" if choices else ""
            details = "; ".join(part for part in (kind, description) if part)
            lines.append(f"- {name}: {details}" if details else f"- {name}")
        return "\n".join(lines)

    def user_message_output_requirements(self, signature: type[dspy.Signature]) -> str | None:
        return None

    def format_field_with_value(self, fields_with_values: dict[Any, Any], role: str = "user") -> str:
        if role == "user":
            return super().format_field_with_value(fields_with_values, role)
        values = {field.name: value for field, value in fields_with_values.items()}
        return json.dumps(values, ensure_ascii=False)

    # Grounded fields (`SPAN_FIELDS`): the grammar lets the model copy only a span of the transcript
    # into them. A 135M model otherwise copies a demo's address ("the factory on Canal Street") into
    # half of its locations, and its demo's names, ages and addresses into 44% of its summaries;
    # under the span rule it can be wrong, but never invent a place.

    def __call__(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, demos: Any, inputs: dict[str, Any]) -> Any:
        token = _CALL_INPUTS.set(inputs)
        try:
            return super().__call__(lm, lm_kwargs, signature, demos, inputs)
        finally:
            _CALL_INPUTS.reset(token)

    async def acall(
        self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, demos: Any, inputs: dict[str, Any]
    ) -> Any:
        token = _CALL_INPUTS.set(inputs)
        try:
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)
        finally:
            _CALL_INPUTS.reset(token)

    def _prepare_response_format(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any) -> None:
        super()._prepare_response_format(lm, lm_kwargs, signature)
        source = (_CALL_INPUTS.get() or {}).get(SPAN_SOURCE)
        response_format = lm_kwargs.get("response_format")
        fields = signature.output_fields
        # A field the program bounded to fixed values (`with_choices`: an empty location) keeps them.
        spans = [name for name in SPAN_FIELDS if name in fields and literal_choices(fields[name].annotation) is None]
        if not spans or not isinstance(source, str):
            return
        if not (isinstance(response_format, type) and issubclass(response_format, pydantic.BaseModel)):
            return
        try:  # DSPy's own strict-mode shaping of a generated schema (private; present in 3.4)
            from dspy.clients.legacy_requests import _strict_json_schema
        except ImportError:  # another DSPy: no span rule; the review queue still flags ungrounded answers
            return

        schema = copy.deepcopy(_strict_json_schema(response_format.model_json_schema()))
        for name in spans:
            schema["properties"][name] = {
                **schema["properties"][name],
                SPAN_OF: source,
                SPAN_MAX_WORDS: SPAN_FIELDS[name],
            }
        lm_kwargs["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": response_format.__name__, "schema": schema, "strict": True},
        }


# The input whose spans the grounded fields may hold, and the current call's inputs (set per call,
# so one adapter can serve concurrent calls).
SPAN_SOURCE = "transcript"
_CALL_INPUTS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("call_inputs", default=None)


def build_lm(settings: Settings, *, num_retries: int = 0, threads: int | None = None) -> LMSetup:
    """The LM named by `settings.model`; `local/...` is the embedded model, anything else DSPy's client."""
    from triage import dspy_speedups
    from triage.local import is_local_model, make_local_lm
    from triage.native_engine import build_native_lm

    dspy_speedups.install()
    if is_local_model(settings.model):
        return LMSetup(make_local_lm(settings.model, threads=threads, cache=settings.cache), GrammarJSONAdapter)
    kwargs: dict[str, Any] = {"timeout": settings.timeout}
    if settings.api_base:
        kwargs["api_base"] = settings.api_base
    if settings.api_key is not None:
        kwargs["api_key"] = settings.api_key.get_secret_value()
    elif settings.api_base:
        kwargs["api_key"] = NO_KEY  # self-hosted servers (vLLM, llama.cpp) often need none; DSPy insists on one
    lm = build_native_lm(settings.model, cache=settings.cache, num_retries=num_retries, client_kwargs=kwargs)
    return LMSetup(lm, ChatAdapter)


def with_prompt_cache(setup: LMSetup, settings: Settings, fixed_demos: int | None) -> LMSetup:
    """The stage's LM, marking the prompt's reusable prefix for the provider's prompt cache where it needs marks.

    Anthropic caches only what a request marks (`cache_control`; DSPy's lm15 places it from a
    `CacheConfig`). With fixed demos (`fixed_demos` of them) the instructions and the demos are
    the same bytes for every row: the mark goes on the last demo message (lm15 counts messages
    after the system prompt: a demo is a user and an assistant message). With per-call demos
    (`fixed_demos` None) only the instructions repeat, and only they are marked. OpenAI caches
    a repeated prefix of 1,024 tokens or more by itself: nothing to mark. Cached reads are
    reported in the usage (`prompt_tokens_details.cached_tokens`) and priced by `triage.cost`.
    """
    from dspy.lm15 import CacheConfig

    if settings.provider != "anthropic":
        return setup
    cache = CacheConfig(prefix_until_index=2 * fixed_demos - 1) if fixed_demos else CacheConfig(prefix="stable")
    return LMSetup(setup.lm.copy(prompt_cache=cache), setup.adapter_class)
