"""The DSPy side: engines (`complete(Request) -> Response`) on a `LlamaRuntime`, and `make_local_lm`."""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from triage.grounding import split_span_properties, with_span_rules
from triage.local.errors import LocalContextLengthError
from triage.local.grammar import (
    DEFAULT_FIELD_MAX_CHARS,
    DEFAULT_MAX_STRING_CHARS,
    bound_string_lengths,
    free_string_fields,
    generic_object_grammar,
    object_layout,
    response_schema,
    schema_to_grammar,
)
from triage.local.runtime import DEFAULT_N_CTX, LlamaRuntime
from triage.local.weights import DEFAULT_LOCAL_MODEL, LOCAL_MODEL_PREFIX, _short_name, local_model_path

if TYPE_CHECKING:
    import dspy
    from dspy.lm15 import Request, Response

DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class GrammarPlan:
    grammar: str
    free_fields: dict[str, int | None]  # see free_string_fields
    object_keys: list[str] | None  # see object_layout


def _request_messages(request: Request) -> list[dict[str, str]]:
    from dspy.lm15 import TextPart, UnsupportedFeatureError

    if request.tools:
        raise UnsupportedFeatureError("the local model does not support tools")
    messages: list[dict[str, str]] = []
    system = request.system
    if system is not None:
        parts = (system,) if isinstance(system, str) else system
        texts = []
        for part in parts:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, TextPart):
                texts.append(part.text)
            else:
                raise UnsupportedFeatureError(f"the local model reads text only, got {type(part).__name__}")
        messages.append({"role": "system", "content": "".join(texts)})
    for message in request.messages:
        if message.role not in ("user", "assistant", "system", "developer"):
            raise UnsupportedFeatureError(f"the local model does not support {message.role!r} messages")
        texts = []
        for part in message.parts:
            if not isinstance(part, TextPart):
                raise UnsupportedFeatureError(f"the local model reads text only, got {type(part).__name__}")
            texts.append(part.text)
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": "".join(texts)})
    return messages


_LOADED_ENGINES: weakref.WeakValueDictionary[str, LocalEngine] = weakref.WeakValueDictionary()
_LOADED_LOCK = threading.Lock()


class LocalEngine:
    """A DSPy 3.4 engine (`complete(Request) -> Response`) running the embedded model.

    Declares structured-output support so `dspy.JSONAdapter` sends the signature's JSON schema;
    the grammar is built from that schema (with bounded strings), or is any JSON object when the
    request has no schema. Greedy unless the request asks for a temperature.
    """

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset({"response_format", "max_tokens", "temperature", "seed"})

    def __init__(
        self,
        model: str = DEFAULT_LOCAL_MODEL,
        *,
        threads: int | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_string_chars: int | None = DEFAULT_MAX_STRING_CHARS,
        field_max_chars: Mapping[str, int] | None = None,
        runtime: LlamaRuntime | None = None,
    ) -> None:
        self.model = LOCAL_MODEL_PREFIX + _short_name(model)
        self.threads = threads
        self.n_ctx = n_ctx
        self.max_tokens = int(max_tokens)
        self.max_string_chars = max_string_chars
        self.field_max_chars = dict(DEFAULT_FIELD_MAX_CHARS if field_max_chars is None else field_max_chars)
        # Resolving the path here fails fast (with the install command) instead of on the first call.
        self.runtime = runtime or LlamaRuntime(local_model_path(self.model), threads=threads, n_ctx=n_ctx)
        self._grammars: OrderedDict[str, GrammarPlan] = OrderedDict()
        self._grammar_lock = threading.Lock()

    # Engines are borrowed by every copy of the LM: copying must not load another model.
    def __copy__(self) -> LocalEngine:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> LocalEngine:
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_grammar_lock", None)
        state["_grammars"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._grammar_lock = threading.Lock()

    def dump_state(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "max_tokens": self.max_tokens,
            "max_string_chars": self.max_string_chars,
            "field_max_chars": self.field_max_chars,
        }

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> LocalEngine:
        # A saved LM records its sync and async engine separately; give both the same engine (one model).
        key = json.dumps(state, sort_keys=True)
        with _LOADED_LOCK:
            engine = _LOADED_ENGINES.get(key)
            if engine is None:
                engine = _LOADED_ENGINES[key] = cls(**state)
        return engine

    def grammar_for(self, schema: dict[str, Any] | None) -> GrammarPlan:
        """The grammar (and its hints for the runtime) for a response schema; None means any JSON object."""
        key = json.dumps(schema, sort_keys=True, default=str)
        with self._grammar_lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        if schema is None:
            built = GrammarPlan(generic_object_grammar(self.max_string_chars), {}, None)
        else:
            schema, spans = split_span_properties(schema)
            bounded = bound_string_lengths(schema, self.max_string_chars, self.field_max_chars)
            grammar = with_span_rules(schema_to_grammar(bounded), spans)
            built = GrammarPlan(grammar, free_string_fields(bounded), object_layout(bounded))
        with self._grammar_lock:
            self._grammars[key] = built
            while len(self._grammars) > 32:
                self._grammars.popitem(last=False)
        return built

    def complete(self, request: Request) -> Response:
        from dspy.clients.engines.base import validate_request
        from dspy.lm15 import ContextLengthError, InvalidRequestError, Message, Response, TextPart, Usage

        validate_request(request)
        messages = _request_messages(request)
        plan = self.grammar_for(response_schema(request))
        config = request.config
        max_tokens = int(config.max_tokens) if config.max_tokens else self.max_tokens
        temperature = float(config.temperature) if config.temperature is not None else 0.0
        try:
            out = self.runtime.generate(
                messages,
                plan.grammar,
                max_tokens,
                free_fields=plan.free_fields,
                object_keys=plan.object_keys,
                temperature=temperature,
                seed=config.seed,
            )
        except LocalContextLengthError as exc:
            raise ContextLengthError(str(exc)) from exc
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        usage = Usage(
            input_tokens=out.prompt_tokens,
            output_tokens=out.completion_tokens,
            total_tokens=out.prompt_tokens + out.completion_tokens,
        )
        return Response(
            id=None,
            model=request.model or self.model,
            message=Message.assistant([TextPart(out.text)]),
            finish_reason="stop" if out.finish_reason == "stop" else "length",
            usage=usage,
        )

    def stream(self, request: Request) -> Iterator[Any]:
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        self.runtime.close()


class AsyncLocalEngine:
    """The async face of a `LocalEngine`: runs it in a worker thread (the runtime's lock serializes calls)."""

    supports_response_schema = LocalEngine.supports_response_schema
    supports_function_calling = LocalEngine.supports_function_calling
    supports_reasoning = LocalEngine.supports_reasoning
    supported_params = LocalEngine.supported_params

    def __init__(self, sync: LocalEngine) -> None:
        self.sync = sync

    def __copy__(self) -> AsyncLocalEngine:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncLocalEngine:
        return self

    def dump_state(self) -> dict[str, Any]:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncLocalEngine:
        return cls(LocalEngine.load_state(state))

    async def complete(self, request: Request) -> Response:
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        from dspy.lm15 import response_to_events

        response = await self.complete(request)
        for event in response_to_events(response):
            yield event

    async def aclose(self) -> None:
        await asyncio.to_thread(self.sync.close)


def make_local_lm(
    model: str = DEFAULT_LOCAL_MODEL,
    *,
    threads: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    cache: bool = True,
    max_string_chars: int | None = DEFAULT_MAX_STRING_CHARS,
    field_max_chars: Mapping[str, int] | None = None,
) -> dspy.LM:
    """A `dspy.LM` on the embedded model; use it with `dspy.JSONAdapter()`.

    The weights load on the first call, once per LM (engine). Unknown names raise ValueError.
    `max_string_chars` bounds every free string output field, `field_max_chars` overrides it per
    field name (default: `DEFAULT_FIELD_MAX_CHARS`, a longer `reasoning`).
    """
    import dspy

    engine = LocalEngine(
        model,
        threads=threads,
        max_tokens=max_tokens,
        max_string_chars=max_string_chars,
        field_max_chars=field_max_chars,
    )
    return dspy.LM(
        engine.model,
        engine=engine,
        async_engine=AsyncLocalEngine(engine),
        cache=cache,
        max_tokens=max_tokens,
        temperature=0.0,
        num_retries=0,
    )
