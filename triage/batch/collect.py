"""Collecting: the jobs' answers as a table, and the stages that parse them like online answers.

`answers_table` lines up each job's entries with the ledger's keys (entry `i` is request `i`):
per row and stage, the provider's `Response` as lm15 JSON, or why there is none (failed in the
job, expired, cancelled, missing). A later round's answer replaces an earlier one.

`BatchTriageStage` and `BatchExtractDetailsStage` are the online stages with one change: a row's
answer is first taken from the batch (`ReplayEngine`: DSPy's adapter parses it, `Stage`'s own
validation checks it, usage is counted as online), and only an answer that is missing, failed or
invalid costs a request: online through the stage's usual path (retries, validation attempts),
or, with `--batch-retry batch`, the row is held back for a new job (`batch_retry_<stage>` holds
the feedback to send with it) until the last round, after which its error is recorded.
Tokens the batch answers cost are counted apart (`batch_prompt_tokens`, ...) for the batch price.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import dspy
import pyarrow as pa
from dspy.lm15 import BatchEntry
from dspy.utils.exceptions import AdapterParseError

from triage.batch.engine import REPLAY, Replay, RequestChanged, replay_lm, response_from_json, response_json
from triage.batch.ledger import JobRecord
from triage.errors import first_line
from triage.lm import LMSetup
from triage.stages import (
    Answer,
    ExtractDetailsStage,
    InvalidAnswer,
    RowOutcome,
    Stage,
    StageConfig,
    TriageStage,
    validation_problems,
)

ANSWER_SCHEMA = pa.schema(
    [
        pa.field("call_id", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("response", pa.string()),  # lm15 Response JSON, or null
        pa.field("problem", pa.string()),  # why there is no response, or null
        pa.field("sha", pa.string()),
        pa.field("feedback", pa.string()),
        pa.field("round", pa.int64()),
    ]
)
BATCH_TOKEN_COLUMNS = ("batch_prompt_tokens", "batch_completion_tokens")
RETRY_PREFIX = "batch_retry_"


def job_answers(job: JobRecord, entries: Iterable[BatchEntry]) -> dict[tuple[str, str], dict[str, Any]]:
    """(call_id, stage) -> answer row for every request of a terminal job."""
    by_index = {entry.index: entry for entry in entries}
    answers = {}
    for index, (call_id, stage, sha, feedback) in enumerate(job.keys):
        entry = by_index.get(index)
        response, problem = None, None
        if entry is None:
            problem = f"no answer in batch job {job.id} ({job.status})"
        elif entry.ok and entry.response is not None:
            response = response_json(entry.response)
        elif entry.outcome == "errored" and entry.error is not None:
            problem = f"failed in batch job {job.id}: {entry.error.message}"
        else:
            problem = f"{entry.outcome} in batch job {job.id}"
        answers[(call_id, stage)] = {
            "call_id": call_id,
            "stage": stage,
            "response": response,
            "problem": problem,
            "sha": sha,
            "feedback": feedback,
            "round": job.round,
        }
    return answers


def answers_table(answers: dict[tuple[str, str], dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(answers.values()), schema=ANSWER_SCHEMA)


class BatchRetry(Exception):  # noqa: N818 - a row held back for another batch round, not a failure
    """The row's answer goes in a new batch job (`--batch-retry batch`)."""


@dataclass
class _Slot:
    """One row's batch answer for this stage, and what the stage learnt about it."""

    answer: dict[str, Any] | None
    retry: str | None = None  # feedback for the new job ("" for none); None: no retry
    prompt_tokens: int = 0
    completion_tokens: int = 0


_SLOT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("batch_slot", default=None)


@dataclass(frozen=True)
class CollectOptions:
    answers: list[Any]  # [ObjectRef of the answers table]: Ray hands the reference itself to each actor
    retry: str = "online"
    last_round: int = 1  # --batch-retry batch: answers from this round on are final
    final: bool = False  # --batch-retry batch: no row is held back any more


class _BatchAnswers:
    """Mixin for a Stage: answers come from the batch first (see the module docstring)."""

    name: ClassVar[str]

    def __init__(self, config: StageConfig, options: CollectOptions, **kwargs: Any) -> None:
        import ray

        super().__init__(config, **kwargs)  # type: ignore[call-arg]
        # The table stays in Ray's shared memory (read zero-copy by every actor on a node); only an
        # index of this stage's rows is built here, and a row is read when its answer is needed.
        self._table = ray.get(options.answers[0])
        stages = self._table.column("stage").to_pylist()
        self._index = {
            call_id: i for i, call_id in enumerate(self._table.column("call_id").to_pylist()) if stages[i] == self.name
        }
        self.options = options
        self.replay = LMSetup(replay_lm(config.settings.model), self.setup.adapter_class)  # type: ignore[attr-defined]

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["call_id", "transcript", "errors"]).to_pylist()
        done = await asyncio.gather(*(self._batch_row(row) for row in rows))
        table = self._merge(batch, [outcome for outcome, _ in done])  # type: ignore[attr-defined]
        for name in batch.column_names:  # what an earlier batch stage added
            if name not in table.column_names:
                table = table.append_column(name, batch.column(name))
        for name, attribute in zip(BATCH_TOKEN_COLUMNS, ("prompt_tokens", "completion_tokens"), strict=True):
            before = table.column(name).to_pylist() if name in table.column_names else [0] * len(done)
            values = pa.array([b + getattr(slot, attribute) for b, (_, slot) in zip(before, done, strict=True)])
            table = _set_column(table, name, values.cast(pa.int64()))
        retry = pa.array([slot.retry for _, slot in done], pa.string())
        return _set_column(table, RETRY_PREFIX + self.name, retry)

    async def _batch_row(self, row: dict[str, Any]) -> tuple[RowOutcome, _Slot]:
        index = self._index.get(row["call_id"])
        slot = _Slot(self._table.slice(index, 1).to_pylist()[0] if index is not None else None)
        token = _SLOT.set(slot)
        try:
            outcome = await self._triage_row(row)  # type: ignore[attr-defined]
        finally:
            _SLOT.reset(token)
        return outcome, slot

    async def answer(self, transcript: str) -> Answer:
        slot = _SLOT.get()
        answer = slot.answer if slot else None
        problem = answer["problem"] if answer else "no batch request was made for it"
        feedback = ""
        if answer and answer["response"] is not None:
            try:
                values = await self._replay(transcript, answer, slot)
                problems = validation_problems(values, self.signature, self.may_be_empty)  # type: ignore[attr-defined]
            except AdapterParseError as exc:
                problems = [f"the answer could not be parsed ({first_line(exc)})"]
            except Exception as exc:
                if (changed := request_changed(exc)) is None:
                    raise
                problems, feedback = [str(changed)], None
            if not problems:
                return Answer(values, 1)
            problem = f"the batch answer was rejected: {'; '.join(problems)}"
            if feedback is not None:
                feedback = self._feedback(problems)  # type: ignore[attr-defined]
        if self.options.retry == "batch":
            if not self.options.final and (answer is None or answer["round"] < self.options.last_round):
                slot.retry = feedback or ""
                raise BatchRetry(problem)
            raise InvalidAnswer(problem)
        return await super().answer(transcript)  # type: ignore[misc]

    async def _replay(self, transcript: str, answer: dict[str, Any], slot: _Slot) -> dict[str, Any]:
        response = response_from_json(answer["response"])
        token = REPLAY.set(Replay(response, answer["sha"]))
        try:
            adapter = self.replay.adapter(answer["feedback"])
            with dspy.context(lm=self.replay.lm, adapter=adapter, disable_history=True):
                try:
                    prediction = await self.program.acall(transcript=transcript)  # type: ignore[attr-defined]
                finally:
                    if request_changed(sys.exc_info()[1]) is None:  # DSPy counted its usage: so do we
                        slot.prompt_tokens += int(response.usage.input_tokens or 0)
                        slot.completion_tokens += int(response.usage.output_tokens or 0)
        finally:
            REPLAY.reset(token)
        return {name: prediction.get(name) for name in self.signature.output_fields}  # type: ignore[attr-defined]


def request_changed(exc: BaseException | None) -> RequestChanged | None:
    """The `RequestChanged` behind `exc` (DSPy wraps what an engine raises), or None."""
    while exc is not None:
        if isinstance(exc, RequestChanged):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


class BatchTriageStage(_BatchAnswers, TriageStage):
    pass


class BatchExtractDetailsStage(_BatchAnswers, ExtractDetailsStage):
    pass


BATCH_STAGES: dict[type[Stage], type[Stage]] = {
    TriageStage: BatchTriageStage,
    ExtractDetailsStage: BatchExtractDetailsStage,
}
