"""A scripted DSPy engine: test answers and failures go in through the real LM seam."""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dspy
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

from triage.programs import NEAREST_DEMOS_KEY

Answer = dict[str, str] | str | BaseException


def chat_answer(fields: dict[str, str]) -> str:
    """An answer in DSPy's ChatAdapter format."""
    body = "".join(f"[[ ## {name} ## ]]\n{value}\n\n" for name, value in fields.items())
    return body + "[[ ## completed ## ]]"


def last_user_text(request: Request) -> str:
    users = [m for m in request.messages if m.role == "user"]
    return users[-1].text or "" if users else ""


class ScriptedEngine:
    """Answers each request with `script(request)`: fields (dict), raw text, or an exception to raise."""

    def __init__(self, script: Callable[[Request], Answer]) -> None:
        self.script = script
        self.requests: list[Request] = []
        self._lock = threading.Lock()

    def complete(self, request: Request) -> Response:
        with self._lock:
            self.requests.append(request)
        answer = self.script(request)
        if isinstance(answer, BaseException):
            raise answer
        text = chat_answer(answer) if isinstance(answer, dict) else answer
        return Response(
            id=None,
            model="scripted",
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=11, output_tokens=7, total_tokens=18),
        )

    def stream(self, request: Request):
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


class AsyncScriptedEngine:
    """The async face of a `ScriptedEngine`; `pause(request)`, when given, is awaited before each answer,
    so requests can overlap on the event loop as real network calls do."""

    def __init__(self, sync: ScriptedEngine, pause: Callable[[Request], Awaitable[None]] | None = None) -> None:
        self.sync = sync
        self.pause = pause

    async def complete(self, request: Request) -> Response:
        if self.pause is not None:
            await self.pause(request)
        return self.sync.complete(request)

    async def stream(self, request: Request):
        for event in self.sync.stream(request):
            yield event

    async def aclose(self) -> None:
        pass


def scripted_lm(
    script: Callable[[Request], Answer], pause: Callable[[Request], Awaitable[None]] | None = None
) -> tuple[dspy.LM, ScriptedEngine]:
    engine = ScriptedEngine(script)
    async_engine = AsyncScriptedEngine(engine, pause)
    lm = dspy.LM("scripted/test", engine=engine, async_engine=async_engine, cache=False, num_retries=0)
    return lm, engine


def transcript_of(request: Request) -> str:
    """The transcript inside a ChatAdapter request."""
    text = last_user_text(request)
    start = text.index("[[ ## transcript ## ]]\n") + len("[[ ## transcript ## ]]\n")
    return text[start : text.rindex("\n\nRespond with")]


def fields_for(kind: str, **values: Any) -> dict[str, str]:
    base = {"reasoning": "r"}
    if kind == "triage":
        base |= {"priority": "urgent", "category": "fire", "summary": "A summary."}
    else:
        base |= {"location": "1 Main St", "subject_description": "a man"}
    return base | {k: str(v) for k, v in values.items()}


def triage_run_command(api_base: str, *extra: str) -> list[str]:
    """`python -m triage run` on calls.jsonl -> out in the working directory, against a fake provider."""
    import sys

    return [
        sys.executable,
        "-m",
        "triage",
        "run",
        "--input",
        "calls.jsonl",
        "--output",
        "out",
        "--model",
        "openai/fake",
        "--api-base",
        api_base,
        *extra,
    ]


def committed_programs_unbounded(folder: Path) -> str:
    """A copy of the committed programs (per-call nearest demos) in `folder`, with the neighbours'
    bound on the labels off: the fake providers answer labels of their own, which a bound would refuse."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in (Path(__file__).resolve().parents[1] / "optimized").glob("*.json"):
        state = json.loads(source.read_text(encoding="utf-8"))
        if isinstance(state, dict) and isinstance(state.get(NEAREST_DEMOS_KEY), dict):
            state[NEAREST_DEMOS_KEY]["choices"] = 0
        (folder / source.name).write_text(json.dumps(state), encoding="utf-8")
    return str(folder)
