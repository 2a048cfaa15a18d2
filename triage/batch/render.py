"""The render pass: each row's requests, built by the same programs and adapter as an online run.

A Ray Data stage (`RenderRequests`, one per actor) runs both stages' programs over a batch of
rows with the recording engine (`triage.batch.engine`): what comes out is one row per input row,
`call_id` and its requests: stage, the request as lm15 JSON, its sha256. Both requests of a row depend only on
its transcript, so one pass renders both. Rows without a transcript (an input problem) have no
requests; a row that cannot be rendered has none either and is answered online when collected.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import dspy
import pyarrow as pa

from triage.batch.engine import RECORDER, Recorder, render_lm, request_json, request_sha
from triage.lm import build_lm
from triage.settings import Settings
from triage.stages import ProgramSource, Stage

logger = logging.getLogger("triage")

# One row per input row, so a row's requests are never split between blocks: `requests` is a JSON
# list of {stage, request (lm15 JSON), sha, feedback (the note on a rejected answer, or null)}.
REQUEST_SCHEMA = pa.schema([pa.field("call_id", pa.string()), pa.field("requests", pa.string())])


@dataclass(frozen=True)
class RenderConfig:
    settings: Settings
    stages: tuple[type[Stage], ...]
    programs: dict[str, ProgramSource]
    # call_id -> {stage: feedback or ""}: render only these stages of these rows (a batch retry round).
    # Held as a one-element list so Ray passes the reference itself, fetched in the actor.
    only: list[Any] | None = None


class RenderRequests:
    """Ray Data callable class: a batch of input rows in, a table of their requests out."""

    def __init__(self, config: RenderConfig) -> None:
        import ray

        self.model = config.settings.model
        self.adapter_class = build_lm(config.settings).adapter_class
        self.lm = render_lm(self.model)
        self.programs: dict[str, dspy.Module] = {}
        for stage in config.stages:
            program = stage.module_class()
            state = config.programs[stage.name].state
            if state is not None:
                program.load_state(state)
            self.programs[stage.name] = program
        self.only: dict[str, dict[str, str]] | None = ray.get(config.only[0]) if config.only else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: list[dict[str, Any]] = []
        for call_id, transcript in zip(
            batch.column("call_id").to_pylist(), batch.column("transcript").to_pylist(), strict=True
        ):
            if transcript is None:
                continue
            wanted = self.only.get(call_id, {}) if self.only is not None else dict.fromkeys(self.programs, "")
            requests = []
            for name, feedback in wanted.items():
                request = self.render(name, transcript, feedback or None)
                if request is not None:
                    requests.append(
                        {"stage": name, "request": request, "sha": request_sha(request), "feedback": feedback or None}
                    )
            if requests:
                out.append({"call_id": call_id, "requests": json.dumps(requests, ensure_ascii=False)})
        return pa.Table.from_pylist(out, schema=REQUEST_SCHEMA)

    def render(self, stage: str, transcript: str, feedback: str | None) -> str | None:
        """The JSON of the one request the stage's program makes for `transcript`, or None if it makes none."""
        recorder = Recorder()
        token = RECORDER.set(recorder)
        try:
            with dspy.context(lm=self.lm, adapter=self.adapter_class(feedback=feedback), disable_history=True):
                self.programs[stage](transcript=transcript)
        except Exception as exc:
            if not recorder.requests:  # a real failure, not the recorder stopping the call
                logger.warning("%s: could not render a request (%s); the row will be answered online", stage, exc)
                return None
        finally:
            RECORDER.reset(token)
        return request_json(recorder.requests[0]) if recorder.requests else None
