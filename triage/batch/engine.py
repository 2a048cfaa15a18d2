"""DSPy engines that record a request instead of sending it, and hand back an answer that came by batch.

Batch mode runs the very programs and adapters of an online run, through DSPy's engine seam
(`dspy.LM(engine=..., async_engine=...)`):

* Render: `RenderEngine.complete(request)` keeps the lm15 `Request` DSPy built (system message,
  demos, nearest-call demos, the transcript) and raises `Rendered`. Nothing leaves the process.
* Replay: `ReplayEngine.complete(request)` returns the provider's `Response` for that request, so
  DSPy counts its usage and its adapter parses and validates it exactly as online. The request is
  rendered again and must hash as the one submitted (`request_sha`): an answer is never given to
  a prompt it was not asked for (say, the programs changed between submitting and collecting).

Which request or answer a call is about travels in a context variable set around the call.
DSPy's cache is off in both LMs: a cached answer would skip the engine.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
from typing import Any

import dspy
from dspy._vendor.lm15 import serde
from dspy.lm15 import Request, Response


class Rendered(Exception):  # noqa: N818 - not an error: the request was recorded instead of sent
    """Raised by the render engine once it has the request (DSPy may wrap it; the recorder has it)."""


class RequestChanged(Exception):
    """The request rendered now is not the one the batch answer is for."""


@dataclasses.dataclass
class Recorder:
    requests: list[Request] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Replay:
    response: Response
    sha: str


RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("batch_recorder", default=None)
REPLAY: contextvars.ContextVar[Replay | None] = contextvars.ContextVar("batch_replay", default=None)


def wire_model(model: str) -> str:
    """The provider's own name of a DSPy model string (`openai/gpt-4.1-mini` -> `gpt-4.1-mini`)."""
    return model.split("/", 1)[1] if "/" in model else model


def request_json(request: Request) -> str:
    """A request as canonical JSON (lm15's own serialization, keys sorted): what is stored and hashed."""
    return json.dumps(serde.request_to_dict(request), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def request_from_json(text: str) -> Request:
    return serde.request_from_dict(json.loads(text))


def request_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def response_json(response: Response) -> str:
    return json.dumps(serde.response_to_dict(response), ensure_ascii=False, separators=(",", ":"))


def response_from_json(text: str) -> Response:
    return serde.response_from_dict(json.loads(text))


class RenderEngine:
    """Records each request (with the provider's model name) in the caller's `Recorder`; sends nothing."""

    def __init__(self, model: str) -> None:
        self.model = wire_model(model)

    def complete(self, request: Request) -> Response:
        recorder = RECORDER.get()
        if recorder is None:
            raise RuntimeError("the render engine was called outside a render pass")
        recorder.requests.append(dataclasses.replace(request, model=self.model))
        raise Rendered("request recorded for a batch job")

    def stream(self, request: Request) -> Any:
        raise RuntimeError("batch requests are not streamed")

    def close(self) -> None:
        pass


class ReplayEngine:
    """Answers with the batch response of the current call, if the request is the one submitted."""

    def __init__(self, model: str) -> None:
        self.model = wire_model(model)

    async def complete(self, request: Request) -> Response:
        replay = REPLAY.get()
        if replay is None:
            raise RuntimeError("the replay engine was called without a batch answer")
        if request_sha(request_json(dataclasses.replace(request, model=self.model))) != replay.sha:
            raise RequestChanged("the prompt differs from the one submitted in the batch job")
        return replay.response

    async def aclose(self) -> None:
        pass


class _NoSync:
    def complete(self, request: Request) -> Response:
        raise RuntimeError("batch replay is asynchronous")

    def stream(self, request: Request) -> Any:
        raise RuntimeError("batch replay is asynchronous")

    def close(self) -> None:
        pass


def render_lm(model: str) -> dspy.LM:
    """An LM whose (synchronous) calls record their request; see `RenderEngine`."""
    engine = RenderEngine(model)
    return dspy.LM(model, engine=engine, async_engine=_AsyncOf(engine), cache=False, num_retries=0)


def replay_lm(model: str) -> dspy.LM:
    """An LM whose (asynchronous) calls answer with the current batch response; see `ReplayEngine`."""
    return dspy.LM(model, engine=_NoSync(), async_engine=ReplayEngine(model), cache=False, num_retries=0)


class _AsyncOf:
    def __init__(self, engine: RenderEngine) -> None:
        self.engine = engine

    async def complete(self, request: Request) -> Response:
        return self.engine.complete(request)

    async def aclose(self) -> None:
        pass
