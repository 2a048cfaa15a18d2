"""A simulated provider with batch APIs: OpenAI's Files + Batches and Anthropic's Message Batches.

Extends `tests.fake_provider.FakeProvider` (same server, same online chat completions, same
answers: `expected_answer` of the transcript) with:

* OpenAI: ``POST /v1/files`` (multipart upload, purpose batch), ``GET /v1/files/{id}/content``,
  ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``,
  ``GET /v1/batches``. Input lines target ``/v1/responses``; output lines carry Responses bodies.
* Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches/{id}``,
  ``GET /v1/messages/batches/{id}/results``, ``POST /v1/messages/batches/{id}/cancel``, and the
  online ``POST /v1/messages`` (for answers sent again online).

A job stays queued/in progress for ``polls`` status reads, then ends with its fate: the
``fates`` list gives the fate of the n-th job created (then ``"completed"``):

* ``completed``: every request answered, except a transcript holding ``BATCH_ERROR`` (an error
  entry) or ``ALWAYS_MALFORMED`` (an answer no adapter parses);
* ``expired``: the first half of its requests answered, the rest expired;
* ``failed``: the job fails whole (OpenAI: status failed, no output; Anthropic: every entry errored).

Every HTTP request is counted (``stats()["routes"]``), and every request inside a job by the
transcript it is about (``stats()["batch_per_transcript"]``, keys as ``per_transcript``).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

from tests.fake_provider import (
    MARKER_MALFORMED,
    FakeProvider,
    _error,
    _Reply,
    answer_content,
    malformed_content,
    parse_request,
    transcript_key,
)

MARKER_BATCH_ERROR = "BATCH_ERROR"


@dataclass
class _Raw(_Reply):
    """A reply whose body is sent as it is (JSONL), not as JSON."""

    body: bytes = b""


@dataclass
class FakeJob:
    id: str
    kind: str  # "openai" or "anthropic"
    requests: list[tuple[str, dict[str, Any]]]  # (custom_id, body)
    fate: str
    metadata: dict[str, Any] | None = None
    endpoint: str = "/v1/responses"
    input_file_id: str | None = None
    polls: int = 0
    status: str = "validating"
    results: list[dict[str, Any]] = field(default_factory=list)  # one per custom_id answered
    output_file_id: str | None = None
    error_file_id: str | None = None


def chat_body(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """A Responses or Messages body as a chat-completions body, so `parse_request` reads it."""
    messages: list[dict[str, Any]] = []
    system = body.get("instructions") if kind == "openai" else body.get("system")
    if isinstance(system, list):
        system = "\n".join(str(part.get("text", "")) for part in system if isinstance(part, dict))
    if system:
        messages.append({"role": "system", "content": system})
    for message in body.get("input" if kind == "openai" else "messages") or []:
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        messages.append({"role": message.get("role"), "content": content})
    return {"model": body.get("model"), "messages": messages}


class FakeBatchProvider(FakeProvider):
    def __init__(self, *, polls: int = 2, fates: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.polls = polls
        self.fates = list(fates or [])
        self.jobs: dict[str, FakeJob] = {}
        self.files: dict[str, bytes] = {}
        self._batch_lock = threading.Lock()
        self._batch_stats: dict[str, Any] = {"routes": {}, "batch_per_transcript": {}, "batch_requests": 0}
        self._ids = 0

    # ── stats ──

    def stats(self) -> dict[str, Any]:
        snapshot = super().stats()
        with self._batch_lock:
            snapshot["routes"] = dict(self._batch_stats["routes"])
            snapshot["batch_per_transcript"] = dict(self._batch_stats["batch_per_transcript"])
            snapshot["batch_requests"] = self._batch_stats["batch_requests"]
            snapshot["jobs"] = {job.id: job.status for job in self.jobs.values()}
        return snapshot

    def _count(self, route: str) -> None:
        with self._batch_lock:
            routes = self._batch_stats["routes"]
            routes[route] = routes.get(route, 0) + 1

    def _next(self, prefix: str) -> str:
        with self._batch_lock:
            self._ids += 1
            return f"{prefix}{self._ids}"

    @staticmethod
    def _render(reply: _Reply, keep_alive: bool) -> bytes:
        if not isinstance(reply, _Raw):
            return FakeProvider._render(reply, keep_alive)
        head = [
            f"HTTP/1.1 {reply.status} OK",
            "Content-Type: application/binary",
            f"Content-Length: {len(reply.body)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
        ]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body

    # ── routing ──

    async def _handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[str, _Reply]:
        path = path.rstrip("/")
        parts = path.split("/")
        if path.startswith("/v1/files") or path.startswith("/v1/batches") or path.startswith("/v1/messages"):
            if path == "/v1/messages" and method == "POST":
                self._count("POST /v1/messages")
                return self._online_message(raw)
            literal = ("v1", "files", "batches", "messages", "content", "cancel", "results")
            route = f"{method} " + "/".join(part if part in literal or not part else "{id}" for part in parts)
            self._count(route)
            if self.api_key is not None and self.api_key not in (
                headers.get("authorization", "").removeprefix("Bearer "),
                headers.get("x-api-key"),
            ):
                return "401", _error(401, "bad key", "invalid_request_error", "invalid_api_key")
            return self._batch_route(method, parts, headers, raw)
        return await super()._handle(method, path, headers, raw)

    def _batch_route(self, method: str, parts: list[str], headers: dict[str, str], raw: bytes) -> tuple[str, _Reply]:
        # parts: ["", "v1", resource, ...]
        resource, rest = parts[2], parts[3:]
        if resource == "files" and method == "POST" and not rest:
            return self._upload(headers, raw)
        if resource == "files" and method == "GET" and len(rest) == 2 and rest[1] == "content":
            data = self.files.get(rest[0])
            return ("ok", _Raw(200, {}, body=data)) if data is not None else ("404", _error(404, "no file", "x", None))
        if resource == "batches" and method == "POST" and not rest:
            return "ok", _Reply(200, self._openai_object(self._create_openai(json.loads(raw))))
        if resource == "batches" and method == "GET" and not rest:
            data = [self._openai_object(job) for job in reversed(self.jobs.values()) if job.kind == "openai"]
            return "ok", _Reply(200, {"object": "list", "data": data, "has_more": False})
        if resource == "messages" and rest[:1] == ["batches"]:
            rest = rest[1:]
            if method == "POST" and not rest:
                return "ok", _Reply(200, self._anthropic_object(self._create_anthropic(json.loads(raw))))
            if method == "GET" and not rest:
                data = [self._anthropic_object(job) for job in self.jobs.values() if job.kind == "anthropic"]
                return "ok", _Reply(200, {"data": data, "has_more": False})
        job = self.jobs.get(rest[0]) if rest else None
        if job is None:
            return "404", _error(404, "no such batch", "invalid_request_error", None)
        render = self._openai_object if job.kind == "openai" else self._anthropic_object
        if method == "GET" and len(rest) == 1:
            self._poll(job)
            return "ok", _Reply(200, render(job))
        if method == "POST" and rest[1:] == ["cancel"]:
            if job.status not in ("completed", "failed", "expired", "ended"):
                self._finish(job, "cancelled")
            return "ok", _Reply(200, render(job))
        if method == "GET" and rest[1:] == ["results"] and job.kind == "anthropic":
            lines = "".join(json.dumps(line) + "\n" for line in job.results)
            return "ok", _Raw(200, {}, body=lines.encode())
        return "404", _error(404, "unknown batch route", "invalid_request_error", None)

    # ── jobs ──

    def _upload(self, headers: dict[str, str], raw: bytes) -> tuple[str, _Reply]:
        message = BytesParser(policy=default_policy).parsebytes(
            f"Content-Type: {headers.get('content-type', '')}\r\n\r\n".encode() + raw
        )
        data = next((p.get_payload(decode=True) for p in message.iter_parts() if p.get_filename()), None)
        if data is None:
            return "400", _error(400, "no file part", "invalid_request_error", None)
        file_id = self._next("file-")
        self.files[file_id] = data
        return "ok", _Reply(200, {"id": file_id, "object": "file", "bytes": len(data), "purpose": "batch"})

    def _new_job(self, kind: str, requests: list[tuple[str, dict[str, Any]]], **extra: Any) -> FakeJob:
        with self._batch_lock:
            index = len(self.jobs)
            self._batch_stats["batch_requests"] += len(requests)
            per = self._batch_stats["batch_per_transcript"]
            for _, body in requests:
                key = transcript_key(parse_request(chat_body(body, kind)).answer_key)
                per[key] = per.get(key, 0) + 1
        fate = self.fates[index] if index < len(self.fates) else "completed"
        job = FakeJob(self._next("batch_" if kind == "openai" else "msgbatch_"), kind, requests, fate, **extra)
        self.jobs[job.id] = job
        return job

    def _create_openai(self, body: dict[str, Any]) -> FakeJob:
        lines = self.files[body["input_file_id"]].decode().splitlines()
        requests = [(item["custom_id"], item["body"]) for item in map(json.loads, filter(None, lines))]
        return self._new_job(
            "openai",
            requests,
            metadata=body.get("metadata"),
            endpoint=body.get("endpoint"),
            input_file_id=body["input_file_id"],
        )

    def _create_anthropic(self, body: dict[str, Any]) -> FakeJob:
        job = self._new_job("anthropic", [(item["custom_id"], item["params"]) for item in body["requests"]])
        job.status = "in_progress"
        return job

    def _poll(self, job: FakeJob) -> None:
        if job.status in ("completed", "failed", "expired", "cancelled", "ended"):
            return
        job.polls += 1
        if job.polls == 1 and job.kind == "openai":
            job.status = "in_progress"
        if job.polls >= self.polls:
            self._finish(job, job.fate)

    def _finish(self, job: FakeJob, fate: str) -> None:
        answered = len(job.requests) if fate == "completed" else len(job.requests) // 2 if fate == "expired" else 0
        outputs, errors = [], []
        for index, (custom_id, body) in enumerate(job.requests):
            request = parse_request(chat_body(body, job.kind))
            if fate == "failed":
                errors.append((custom_id, "the job failed"))
            elif index >= answered:
                errors.append((custom_id, fate))
            elif MARKER_BATCH_ERROR in request.answer_key:
                errors.append((custom_id, "server error inside the batch"))
            else:
                malformed = MARKER_MALFORMED in request.answer_key
                content = malformed_content(request, prose=True) if malformed else answer_content(request)
                outputs.append((custom_id, request, content))
        if job.kind == "openai":
            self._finish_openai(job, fate, outputs, errors)
        else:
            self._finish_anthropic(job, outputs, errors)

    def _finish_openai(self, job: FakeJob, fate: str, outputs: list, errors: list) -> None:
        job.status = fate
        if fate == "failed":
            return
        lines = []
        for custom_id, request, content in outputs:
            tokens = len(content.split())
            body = {
                "id": self._next("resp_"),
                "object": "response",
                "status": "completed",
                "model": request.model,
                "output": [
                    {
                        "type": "message",
                        "id": self._next("msg_"),
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": content, "annotations": []}],
                    }
                ],
                "usage": {
                    "input_tokens": request.prompt_tokens,
                    "output_tokens": tokens,
                    "total_tokens": request.prompt_tokens + tokens,
                },
            }
            lines.append(
                {
                    "id": self._next("breq_"),
                    "custom_id": custom_id,
                    "response": {"status_code": 200, "request_id": "r", "body": body},
                    "error": None,
                }
            )
        error_lines = [
            {
                "id": self._next("breq_"),
                "custom_id": custom_id,
                "response": {
                    "status_code": 500,
                    "request_id": "r",
                    "body": {"error": {"message": why, "type": "server_error"}},
                },
                "error": None,
            }
            for custom_id, why in errors
            if why not in ("expired", "cancelled")  # those are simply missing from the files
        ]
        job.output_file_id = self._store(lines)
        job.error_file_id = self._store(error_lines) if error_lines else None

    def _finish_anthropic(self, job: FakeJob, outputs: list, errors: list) -> None:
        job.status = "ended"
        for custom_id, request, content in outputs:
            job.results.append(
                {"custom_id": custom_id, "result": {"type": "succeeded", "message": _message(request, content)}}
            )
        for custom_id, why in errors:
            if why in ("expired", "cancelled"):
                job.results.append(
                    {"custom_id": custom_id, "result": {"type": "expired" if why == "expired" else "canceled"}}
                )
            else:
                job.results.append(
                    {
                        "custom_id": custom_id,
                        "result": {
                            "type": "errored",
                            "error": {"type": "error", "error": {"type": "api_error", "message": why}},
                        },
                    }
                )

    def _store(self, lines: list[dict[str, Any]]) -> str:
        file_id = self._next("file-")
        self.files[file_id] = "".join(json.dumps(line) + "\n" for line in lines).encode()
        return file_id

    def _openai_object(self, job: FakeJob) -> dict[str, Any]:
        failed = sum(1 for line in self._lines(job.error_file_id))
        completed = sum(1 for line in self._lines(job.output_file_id))
        return {
            "id": job.id,
            "object": "batch",
            "endpoint": job.endpoint,
            "input_file_id": job.input_file_id,
            "completion_window": "24h",
            "status": job.status,
            "output_file_id": job.output_file_id,
            "error_file_id": job.error_file_id,
            "created_at": 1_700_000_000,
            "request_counts": {"total": len(job.requests), "completed": completed, "failed": failed},
            "metadata": job.metadata,
            "errors": {"data": [{"code": "failed", "message": "the job failed"}]} if job.status == "failed" else None,
        }

    def _lines(self, file_id: str | None) -> list[str]:
        return [line for line in self.files.get(file_id, b"").decode().splitlines() if line] if file_id else []

    def _anthropic_object(self, job: FakeJob) -> dict[str, Any]:
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        if job.status != "ended":
            counts["processing"] = len(job.requests)
        for line in job.results:
            counts[line["result"]["type"]] += 1
        return {
            "id": job.id,
            "type": "message_batch",
            "processing_status": job.status,
            "request_counts": counts,
            "created_at": "2026-01-01T00:00:00Z",
            "ended_at": "2026-01-01T01:00:00Z" if job.status == "ended" else None,
            "expires_at": "2026-01-02T00:00:00Z",
            "results_url": f"{self.url}/messages/batches/{job.id}/results" if job.status == "ended" else None,
        }

    # ── online Anthropic ──

    def _online_message(self, raw: bytes) -> tuple[str, _Reply]:
        body = json.loads(raw)
        request = parse_request(chat_body(body, "anthropic"))
        key = transcript_key(request.answer_key)
        with self._lock:
            per = self._stats["per_transcript"]
            per[key] = per.get(key, 0) + 1
        malformed = MARKER_MALFORMED in request.answer_key
        content = malformed_content(request, prose=True) if malformed else answer_content(request)
        return "ok", _Reply(200, _message(request, content))


def _message(request: Any, content: str) -> dict[str, Any]:
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": [{"type": "text", "text": content}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": request.prompt_tokens, "output_tokens": len(content.split())},
    }
