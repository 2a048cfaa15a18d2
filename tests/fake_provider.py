"""A simulated OpenAI-compatible chat-completions provider for tests and benchmarks.

Stdlib only: an asyncio-streams HTTP/1.1 server (keep-alive, Content-Length bodies) that answers
``POST /v1/chat/completions`` the way DSPy's ChatAdapter / JSONAdapter expect, with answers that are a
deterministic function of the transcript in the request (see :func:`expected_answer`), so a mix-up
between rows shows up as a wrong answer rather than passing silently.

Two ways to run it:

* In-process, for pytest: ``with FakeProvider(latency=0.01) as fp: dspy.LM("openai/x", api_base=fp.url, ...)``.
  The server runs in a daemon thread with its own event loop; :meth:`FakeProvider.stats` is thread-safe.
* Standalone, for the benchmark: ``python -m tests.fake_provider --port 0 --latency 0.2 --rpm 3000``
  prints ``READY http://127.0.0.1:PORT/v1`` once listening and, on SIGTERM/SIGINT, one JSON line of stats.
  ``GET /_fake/stats`` returns the same stats while it runs and ``POST /_fake/reset`` resets them.

Per chat request, in this order (the first that applies decides the reply):

1. ``api_key`` set and the request lacks ``Authorization: Bearer <api_key>``: 401.
2. Body is not a JSON object (or asks for ``stream``): 400.
3. Transcript contains ``ALWAYS_429``: 429 with ``Retry-After: retry_after``.
4. ``rpm`` set and the token bucket is empty: 429 with ``Retry-After`` = seconds until a token is back.
5. With probability ``rate_429``: 429 with ``Retry-After: retry_after``.
6. Sleep ``latency`` (+/- ``jitter``) seconds. Errors above are immediate, like a real provider's limiter.
7. Transcript contains ``ALWAYS_500``, or with probability ``rate_500``: 500.
8. Transcript contains ``ALWAYS_MALFORMED``, or with probability ``rate_malformed``: a 200 whose content
   no DSPy adapter can parse (prose, or ``banana`` values with the last field missing).
9. ``handler(request_json)`` returns a string: that string is the content (outcome ``handler``).
10. Otherwise: the fields of :func:`expected_answer` in ChatAdapter or JSON format (outcome ``ok``).

The random draws for steps 5, 7, 8 and the jitter are taken for every request that gets past step 2, in
arrival order, from ``random.Random(seed)``: a run with the same seed and the same arrival order injects
the same faults.

Rate limit (``rpm``): a token bucket refilled at ``rpm / 60`` tokens per second holding at most
``rpm_burst`` tokens (default ``max(1, rpm / 60)``, i.e. about one second's worth), starting full. So
``rpm=3000`` allows a burst of 50 then 50 requests/s, and ``rpm=60`` answers a second immediate request
with 429 and ``Retry-After: 1``-ish. Rejected requests take no token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import math
import random
import re
import signal
import sys
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

PRIORITIES: tuple[str, ...] = ("urgent", "non_urgent", "not_an_emergency")
CATEGORIES: tuple[str, ...] = ("crime", "medical", "fire", "animal", "noise", "other")

MARKER_MALFORMED = "ALWAYS_MALFORMED"
MARKER_500 = "ALWAYS_500"
MARKER_429 = "ALWAYS_429"

TRANSCRIPT_HEADER = "[[ ## transcript ## ]]\n"
# The adapters' reminders at the end of the last user message (ChatAdapter, JSONAdapter). The transcript ends
# at the LAST occurrence, so a transcript that itself contains "\n\nRespond with" is still extracted whole.
_INSTRUCTION_STARTS = (
    "\n\nRespond with the corresponding output fields",
    "\n\nRespond with a JSON object",
)
_GENERIC_INSTRUCTION_START = "\n\nRespond with"
_FIELD_LINE = re.compile(r"^\d+\. `([^`]+)`", re.MULTILINE)
_CHAT_INSTRUCTION_FIELD = re.compile(r"`\[\[ ## (\w+) ## \]\]`")
_BACKTICK_FIELD = re.compile(r"`(\w+)`")

OUTCOMES: tuple[str, ...] = ("ok", "malformed", "handler", "429", "500", "401", "400", "404")

Handler = Callable[[dict[str, Any]], "str | None | Awaitable[str | None]"]


# ─── Expected answers ────────────────────────────────────────────────────────────────────────────────────────


def transcript_crc(transcript: str) -> int:
    """The CRC-32 of the transcript's UTF-8 bytes: the seed of every answer about it."""
    return zlib.crc32(transcript.encode("utf-8"))


def transcript_key(transcript: str) -> str:
    """The key of ``stats()["per_transcript"]`` (decimal CRC as a string, so it survives a JSON round trip)."""
    return str(transcript_crc(transcript))


def expected_answer(transcript: str) -> dict[str, str]:
    """The answer the provider gives for ``transcript``: a pure, deterministic function of its CRC-32.

    Every value but the summary mentions the CRC, so answers for two different rows never coincide. The
    summary quotes the first five words with whitespace collapsed, keeping every value on one line (the
    ChatAdapter format is line-based), and names nothing the call does not (a well-behaved model's summary
    is not flagged by the review queue).
    """
    crc = transcript_crc(transcript)
    priority = PRIORITIES[crc % len(PRIORITIES)]
    category = CATEGORIES[(crc // len(PRIORITIES)) % len(CATEGORIES)]
    snippet = " ".join(transcript.split()[:5])
    return {
        "reasoning": f"Call {crc} reads as {category}, {priority}.",
        "priority": priority,
        "category": category,
        "summary": f'Caller reported: "{snippet}".',
        "location": f"{crc % 9000 + 100} Fake Street #{crc}",
        "subject_description": f"subject-{crc}",
    }


# ─── Reading DSPy's prompt ─────────────────────────────────────────────────────────────────────────────────


def message_text(message: dict[str, Any]) -> str:
    """The text of one chat message; content may be a string or a list of ``{"type": "text"}`` parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def extract_transcript(user_text: str, next_input_field: str | None = None) -> str | None:
    """The transcript in DSPy's last user message, verbatim, or None when there is no transcript header.

    It is the text after the first ``[[ ## transcript ## ]]\\n`` up to, in order of preference: the header of
    ``next_input_field`` (when the signature has another input after the transcript); the LAST adapter
    reminder ("Respond with the corresponding output fields..." / "Respond with a JSON object..."), so text
    appended after the reminder (feedback notes) is excluded and blank lines inside the transcript are kept;
    the last "\\n\\nRespond with"; the end of the message.
    """
    start = user_text.find(TRANSCRIPT_HEADER)
    if start < 0:
        bare = TRANSCRIPT_HEADER.rstrip("\n")
        # DSPy strips the whole message, so an empty transcript that ends the message loses its newline.
        return "" if user_text.rstrip().endswith(bare) else None
    body = user_text[start + len(TRANSCRIPT_HEADER) :]
    if next_input_field:
        end = body.find(f"\n\n[[ ## {next_input_field} ## ]]\n")
        if end >= 0:
            return body[:end]
    end = max(body.rfind(marker) for marker in _INSTRUCTION_STARTS)
    if end < 0:
        end = body.rfind(_GENERIC_INSTRUCTION_START)
    return body[:end] if end >= 0 else body


def _numbered_fields(system: str, title: str, stop: str) -> list[str]:
    start = system.find(title)
    if start < 0:
        return []
    section = system[start + len(title) :]
    end = section.find(stop)
    return _FIELD_LINE.findall(section if end < 0 else section[:end])


def input_fields(system: str) -> list[str]:
    """Input field names from the adapter's system message ("Your input fields are:\\n1. `transcript` ...")."""
    return _numbered_fields(system, "Your input fields are:", "Your output fields are:")


def output_fields(system: str) -> list[str]:
    """Output field names from the adapter's system message ("Your output fields are:\\n1. `reasoning` ...")."""
    return _numbered_fields(system, "Your output fields are:", "All interactions will be structured")


@dataclass
class ParsedRequest:
    """What the server reads from one chat-completions body."""

    system: str
    last_user: str
    transcript: str | None  # None: no transcript header in the last user message
    answer_key: str  # the text answers and markers are computed from: the transcript, else the last user message
    fields: list[str]
    json_mode: bool
    prompt_tokens: int
    n: int = 1
    model: str = "fake"


def parse_request(body: dict[str, Any]) -> ParsedRequest:
    """Read the system message, last user message, transcript, wanted fields and format of a request."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    texts = [message_text(m) for m in messages]
    system = "\n".join(t for m, t in zip(messages, texts, strict=True) if m.get("role") in ("system", "developer"))
    users = [t for m, t in zip(messages, texts, strict=True) if m.get("role") == "user"]
    last_user = users[-1] if users else ""

    inputs = input_fields(system)
    following = inputs[inputs.index("transcript") + 1] if "transcript" in inputs[:-1] else None
    transcript = extract_transcript(last_user, following)
    answer_key = transcript if transcript is not None else last_user.strip()

    instruction = last_user
    if transcript is not None:
        instruction = last_user[last_user.find(TRANSCRIPT_HEADER) + len(TRANSCRIPT_HEADER) + len(transcript) :]
    response_format = body.get("response_format")
    json_mode = (
        (isinstance(response_format, dict) and response_format.get("type") not in (None, "text"))
        or instruction.lstrip().startswith("Respond with a JSON object")
        or "Outputs will be a JSON object" in system
    )

    fields = output_fields(system)
    if not fields:
        fields = _fields_from_schema(response_format) or _fields_from_instruction(instruction)
    n = body.get("n")
    return ParsedRequest(
        system=system,
        last_user=last_user,
        transcript=transcript,
        answer_key=answer_key,
        fields=fields,
        json_mode=json_mode,
        prompt_tokens=sum(len(t.split()) for t in texts),
        n=n if isinstance(n, int) and 1 <= n <= 16 else 1,
        model=str(body.get("model") or "fake"),
    )


def _fields_from_schema(response_format: Any) -> list[str]:
    try:
        return list(response_format["json_schema"]["schema"]["properties"])
    except (TypeError, KeyError):
        return []


def _fields_from_instruction(instruction: str) -> list[str]:
    chat = [name for name in _CHAT_INSTRUCTION_FIELD.findall(instruction) if name != "completed"]
    if chat:
        return chat
    reminder = instruction.lstrip()
    if reminder.startswith("Respond with a JSON object"):
        return _BACKTICK_FIELD.findall(reminder.split("\n\n", 1)[0])
    return []


def format_content(values: dict[str, str], json_mode: bool) -> str:
    """Render field values as a JSONAdapter (JSON object) or ChatAdapter (``[[ ## f ## ]]`` sections) reply."""
    if json_mode:
        return json.dumps(values, ensure_ascii=False)
    sections = [f"[[ ## {name} ## ]]\n{value}" for name, value in values.items()]
    sections.append("[[ ## completed ## ]]")
    return "\n\n".join(sections)


def answer_content(request: ParsedRequest) -> str:
    """The well-formed reply content for a request: every wanted field, from :func:`expected_answer`."""
    answer = expected_answer(request.answer_key)
    if not request.fields:  # a raw prompt, not an adapter's: answer in prose
        return answer["summary"]
    return format_content({name: answer.get(name, "n/a") for name in request.fields}, request.json_mode)


def malformed_content(request: ParsedRequest, prose: bool) -> str:
    """A 200 reply that neither adapter can parse: prose, or ``banana`` values with the last field missing.

    Dropping a field matters: a signature with only ``str`` outputs would accept ``banana``.
    """
    if prose or len(request.fields) < 2:
        return "I'm sorry, I can't help with that request right now."
    return format_content({name: "banana" for name in request.fields[:-1]}, request.json_mode)


# ─── Server ────────────────────────────────────────────────────────────────────────────────────────────────


class _TokenBucket:
    """``rate`` tokens per second, at most ``capacity``, starting full. Not thread-safe: event loop only."""

    def __init__(self, rpm: float, burst: float | None) -> None:
        self.rate = rpm / 60.0
        self.capacity = burst if burst is not None else max(1.0, self.rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def acquire(self) -> float:
        """Take a token and return 0, or return the seconds until one is available (taking nothing)."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def _seconds_header(seconds: float | str) -> str:
    """A Retry-After value: whole seconds as an integer, otherwise up to milliseconds (rounded up)."""
    if isinstance(seconds, str):
        return seconds
    if float(seconds).is_integer():
        return str(int(seconds))
    return f"{math.ceil(seconds * 1000) / 1000:.3f}".rstrip("0").rstrip(".")


_REASONS = {
    200: "OK",
    100: "Continue",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}
_MAX_BODY = 64 * 1024 * 1024


@dataclass
class _Reply:
    status: int
    payload: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _error(status: int, message: str, type_: str, code: str | None, **headers: str) -> _Reply:
    return _Reply(status, {"error": {"message": message, "type": type_, "param": None, "code": code}}, headers)


class FakeProvider:
    """The simulated provider; see the module docstring for what it answers and when.

    Use as a context manager (``with FakeProvider(...) as fp``) or call :meth:`start` / :meth:`stop`.
    ``handler`` runs on the server's event loop thread: keep it quick (it may be a coroutine function).
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        jitter: float = 0.0,
        rate_429: float = 0.0,
        rate_500: float = 0.0,
        rate_malformed: float = 0.0,
        retry_after: float | str | None = 0.05,
        rpm: float | None = None,
        rpm_burst: float | None = None,
        api_key: str | None = None,
        seed: int = 0,
        handler: Handler | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.latency = latency
        self.jitter = jitter
        self.rate_429 = rate_429
        self.rate_500 = rate_500
        self.rate_malformed = rate_malformed
        self.retry_after = retry_after
        self.rpm = rpm
        self.rpm_burst = rpm_burst
        self.api_key = api_key
        self.seed = seed
        self.handler = handler
        self.host = host
        self.port = port

        self._rng = random.Random(seed)
        self._bucket = _TokenBucket(rpm, rpm_burst) if rpm else None
        self._lock = threading.Lock()
        self._stats = self._fresh_stats()
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()

    # ── lifecycle ──

    @property
    def url(self) -> str:
        """The OpenAI base URL (``api_base``) to give clients: ``http://HOST:PORT/v1``."""
        if not self.port:
            raise RuntimeError("FakeProvider is not listening yet; call start()")
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeProvider:
        """Serve from a daemon thread with its own event loop; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeProvider already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self.serve(on_ready=ready.set))
            except BaseException as exc:  # surfaced to start(); the thread has nowhere else to report it
                failure.append(exc)
                ready.set()

        self._thread = threading.Thread(target=run, name=f"fake-provider-{id(self):x}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop serving, close every connection and join the thread. Idempotent."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve on the running loop until :meth:`request_stop` (or :meth:`stop`) is called."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        server = await asyncio.start_server(self._connection, self.host, self.port, backlog=2048, limit=1 << 20)
        self.port = server.sockets[0].getsockname()[1]
        with self._lock:
            self._stats["url"] = self.url
        if on_ready is not None:
            on_ready()
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            for task in list(self._conn_tasks):
                task.cancel()
            await asyncio.gather(*self._conn_tasks, return_exceptions=True)
            await server.wait_closed()

    def request_stop(self) -> None:
        """Ask :meth:`serve` to return; call from the serving loop (e.g. a signal handler)."""
        if self._stop_event is not None:
            self._stop_event.set()

    # ── stats ──

    def _fresh_stats(self) -> dict[str, Any]:
        return {
            "url": f"http://{self.host}:{self.port}/v1" if self.port else None,
            "requests": 0,
            "outcomes": dict.fromkeys(OUTCOMES, 0),
            "rpm_limited": 0,  # the part of outcomes["429"] caused by the rpm limit
            "in_flight": 0,
            "max_in_flight": 0,
            "in_flight_seconds": 0.0,  # summed over requests: / (last - first request) = mean in flight
            "connections": 0,
            "first_request_monotonic": None,  # time.monotonic(): comparable across processes on one Linux host
            "first_request_wall": None,
            "last_request_monotonic": None,
            "last_request_wall": None,
            "per_transcript": {},  # transcript_key(t) -> chat requests about t (any outcome after auth)
            "ok_per_transcript": {},  # transcript_key(t) -> well-formed answers (outcome "ok") about t
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }

    def stats(self) -> dict[str, Any]:
        """A consistent deep-enough copy of the counters; safe to call from any thread while serving."""
        with self._lock:
            snapshot = dict(self._stats)
            for key in ("outcomes", "per_transcript", "ok_per_transcript"):
                snapshot[key] = dict(self._stats[key])
        return snapshot

    def reset_stats(self) -> None:
        """Zero the counters (in-flight requests still count down correctly). RNG and rpm bucket are kept."""
        with self._lock:
            in_flight = self._stats["in_flight"]
            self._stats = self._fresh_stats()
            self._stats["in_flight"] = in_flight
            self._stats["max_in_flight"] = in_flight

    # ── HTTP ──

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        with self._lock:
            self._stats["connections"] += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    await self._write(writer, _error(431, "headers too large", "invalid_request_error", None), False)
                    return
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                try:
                    method, target, version, headers = self._parse_head(head)
                except ValueError:
                    await self._write(writer, _error(400, "bad request line", "invalid_request_error", None), False)
                    return
                connection = headers.get("connection", "").lower()
                keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await self._read_body(reader, headers)
                if body is None:
                    await self._write(writer, _error(413, "bad body framing", "invalid_request_error", None), False)
                    return
                path = target.split("?", 1)[0]
                if path.startswith("/_fake/"):
                    await self._write(writer, self._admin(method, path), keep_alive)
                else:
                    await self._counted(writer, method, path, headers, body, keep_alive)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Only stop() cancels these. Ending normally matters on 3.11: asyncio's stream callback calls
            # task.exception() on a cancelled connection task and logs a spurious CancelledError traceback.
            return
        finally:
            self._conn_tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, sep, value = line.partition(":")
                if not sep:
                    raise ValueError(line)
                headers[name.strip().lower()] = value.strip()
        return method, target, version, headers

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes | None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                try:
                    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip() or b"0", 16)
                except ValueError:
                    return None
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            return None
        if length < 0 or length > _MAX_BODY:
            return None
        return await reader.readexactly(length) if length else b""

    @staticmethod
    def _render(reply: _Reply, keep_alive: bool) -> bytes:
        payload = json.dumps(reply.payload, ensure_ascii=False).encode("utf-8")
        lines = [
            f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
        ]
        lines.extend(f"{name}: {value}" for name, value in reply.headers.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload

    async def _write(self, writer: asyncio.StreamWriter, reply: _Reply, keep_alive: bool) -> None:
        writer.write(self._render(reply, keep_alive))
        await writer.drain()

    async def _counted(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        """One counted request: in flight from the end of its body until its reply is handed to the socket.

        The counters are settled before the reply is written, so a client that has its reply also sees it in
        the stats (no in_flight of 1 lingering after the last response arrived).
        """
        mono, wall = time.monotonic(), time.time()
        with self._lock:
            s = self._stats
            s["requests"] += 1
            s["in_flight"] += 1
            s["max_in_flight"] = max(s["max_in_flight"], s["in_flight"])
            if s["first_request_monotonic"] is None:
                s["first_request_monotonic"], s["first_request_wall"] = mono, wall
            s["last_request_monotonic"], s["last_request_wall"] = mono, wall
        settled = False
        try:
            outcome, reply = await self._handle(method, path, headers, body)
            data = self._render(reply, keep_alive)
            with self._lock:
                self._stats["outcomes"][outcome] = self._stats["outcomes"].get(outcome, 0) + 1
                self._stats["in_flight"] -= 1
                self._stats["in_flight_seconds"] += time.monotonic() - mono
                settled = True
            writer.write(data)
            await writer.drain()
        finally:
            if not settled:
                with self._lock:
                    self._stats["in_flight"] -= 1

    def _admin(self, method: str, path: str) -> _Reply:
        if path == "/_fake/stats":
            return _Reply(200, self.stats())
        if path == "/_fake/reset" and method == "POST":
            self.reset_stats()
            return _Reply(200, {"reset": True})
        return _error(404, f"no admin route {method} {path}", "invalid_request_error", None)

    # ── the provider ──

    async def _handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[str, _Reply]:
        if method == "GET" and path.rstrip("/") in ("/v1/models", "/models"):
            return "ok", _Reply(200, {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "x"}]})
        if method != "POST" or path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return "404", _error(404, f"unknown route {method} {path}", "invalid_request_error", "unknown_url")
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return "401", _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        try:
            body = json.loads(raw)
        except ValueError:
            return "400", _error(400, "body is not JSON", "invalid_request_error", None)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return "400", _error(400, "'messages' is required", "invalid_request_error", None)
        if body.get("stream"):
            return "400", _error(400, "the fake provider does not stream", "invalid_request_error", None)

        request = parse_request(body)
        key = transcript_key(request.answer_key)
        with self._lock:
            per = self._stats["per_transcript"]
            per[key] = per.get(key, 0) + 1
        # Fixed draws per request keep the fault sequence a function of the seed and arrival order only.
        rng = self._rng
        draw_429, draw_500, draw_malformed, draw_jitter, draw_style = (rng.random() for _ in range(5))
        text = request.answer_key

        if MARKER_429 in text:
            return "429", self._too_many(self.retry_after, "ALWAYS_429 marker")
        if self._bucket is not None:
            wait = self._bucket.acquire()
            if wait > 0:
                with self._lock:
                    self._stats["rpm_limited"] += 1
                return "429", self._too_many(wait, f"limit of {self.rpm:g} requests per minute reached")
        if draw_429 < self.rate_429:
            return "429", self._too_many(self.retry_after, "injected rate limit")

        delay = max(0.0, self.latency + (2 * draw_jitter - 1) * self.jitter)
        if delay:
            await asyncio.sleep(delay)

        if MARKER_500 in text or draw_500 < self.rate_500:
            return "500", _error(500, "The server had an error while processing your request.", "server_error", None)
        if MARKER_MALFORMED in text or draw_malformed < self.rate_malformed:
            return "malformed", self._completion(request, malformed_content(request, prose=draw_style < 0.5))
        if self.handler is not None:
            try:
                custom = self.handler(body)
                if inspect.isawaitable(custom):
                    custom = await custom
            except Exception as exc:  # a broken test hook should fail the request visibly, not the server
                return "500", _error(500, f"handler raised {exc!r}", "server_error", "handler_error")
            if custom is not None:
                return "handler", self._completion(request, custom)
        with self._lock:
            ok = self._stats["ok_per_transcript"]
            ok[key] = ok.get(key, 0) + 1
        return "ok", self._completion(request, answer_content(request))

    def _too_many(self, seconds: float | str | None, why: str) -> _Reply:
        headers = {} if seconds is None else {"Retry-After": _seconds_header(seconds)}
        return _error(429, f"Rate limit exceeded: {why}.", "requests", "rate_limit_exceeded", **headers)

    def _completion(self, request: ParsedRequest, content: str) -> _Reply:
        completion_tokens = len(content.split()) * request.n
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            self._stats["prompt_tokens"] += request.prompt_tokens
            self._stats["completion_tokens"] += completion_tokens
        choice = {"role": "assistant", "content": content}
        return _Reply(
            200,
            {
                "id": f"chatcmpl-fake-{ident}",
                "object": "chat.completion",
                "created": 0,
                "model": request.model,
                "choices": [
                    {"index": i, "message": dict(choice), "logprobs": None, "finish_reason": "stop"}
                    for i in range(request.n)
                ],
                "usage": {
                    "prompt_tokens": request.prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": request.prompt_tokens + completion_tokens,
                },
            },
            {"x-request-id": f"fake-{ident}"},
        )


# ─── Standalone process ────────────────────────────────────────────────────────────────────────────────────


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.fake_provider", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (see the READY line)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds per successful request")
    p.add_argument("--jitter", type=float, default=0.0, help="latency varies uniformly by +/- this many seconds")
    p.add_argument("--rate-429", type=float, default=0.0, help="probability of an injected 429")
    p.add_argument("--rate-500", type=float, default=0.0, help="probability of an injected 500")
    p.add_argument("--rate-malformed", type=float, default=0.0, help="probability of an unparseable 200")
    p.add_argument(
        "--retry-after", default="0.05", help="Retry-After of injected 429s: seconds, or 'none' for no header"
    )
    p.add_argument("--rpm", type=float, default=None, help="requests per minute (token bucket; see module doc)")
    p.add_argument("--rpm-burst", type=float, default=None, help="bucket size; default max(1, rpm/60)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (else 401)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-file", default=None, help="also write the final stats JSON to this file")
    return p


def _retry_after_arg(value: str) -> float | str | None:
    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        return value  # e.g. an HTTP-date, sent verbatim


async def _standalone(provider: FakeProvider) -> None:
    loop = asyncio.get_running_loop()

    def ready() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, provider.request_stop)
        print(f"READY {provider.url}", flush=True)

    await provider.serve(on_ready=ready)


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then print the stats as one JSON line."""
    args = _parser().parse_args(argv)
    provider = FakeProvider(
        latency=args.latency,
        jitter=args.jitter,
        rate_429=args.rate_429,
        rate_500=args.rate_500,
        rate_malformed=args.rate_malformed,
        retry_after=_retry_after_arg(args.retry_after),
        rpm=args.rpm,
        rpm_burst=args.rpm_burst,
        api_key=args.api_key,
        seed=args.seed,
        host=args.host,
        port=args.port,
    )
    asyncio.run(_standalone(provider))
    line = json.dumps(provider.stats(), sort_keys=True)
    if args.stats_file:
        with open(args.stats_file, "w", encoding="utf-8") as fh:
            fh.write(line + "\n")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
