"""Ray Data adapters that run the pure DSPy modules of `triage.programs` at scale.

Data flow (one place): every batch is an Arrow table with the output schema
(`triage.schema.WORKING_SCHEMA`). The reader fills `call_id`, `transcript`, `model`, zero
token counts, `errors` for rows that cannot be triaged ("input: ...") and `review` for a
transcript it had to cut. Each stage then fills its own output fields for every other row,
adds the tokens it spent, stamps `triaged_at`, appends its reasons to doubt the answer to
`review` (`triage.review`; the answer itself is never changed), and appends its failure to
`errors` ("triage: ...") leaving its fields null.
Rows without a transcript (the reader's problem is in `errors`) are passed through untouched.
Exactly one output row leaves a stage for each row that enters it, in the same order.

A stage is a callable class: Ray Data builds it once per actor (the LM, the adapter and
the optimized program are set up in `__init__`) and calls it on batches from an event
loop on another thread, so the LM is passed with `dspy.context` per call, never with
`dspy.configure`. Rows of a batch run concurrently, with at most `in_flight` LM requests
open per actor at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import dspy
import pyarrow as pa
from dspy.utils.exceptions import AdapterParseError, LMRateLimitError, is_retryable_lm_error
from dspy.utils.usage_tracker import track_usage
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from triage.cost import CEILING_ERROR, prices
from triage.errors import first_line, redact
from triage.lm import LMSetup, build_lm, with_prompt_cache
from triage.programs import CallTriager, DetailExtractor, ExtractDetails, TriageCall, literal_choices
from triage.ratelimit import NoLimit, RateLimiter, RayLimiterRef, estimate_tokens
from triage.review import (
    NEIGHBOURS,
    attempts_reason,
    bound_reasons,
    choice_reasons,
    cue_reasons,
    grounding_reasons,
    join_reasons,
    priority_reasons,
    reader_reasons,
    urgent_first,
)
from triage.schema import WORKING_SCHEMA
from triage.settings import Settings

logger = logging.getLogger("triage")

MAX_ERROR_CHARS = 500
# Completion tokens booked per request before the answer is known (settled afterwards).
EXPECTED_COMPLETION_TOKENS = 300


@dataclass(frozen=True)
class ProgramSource:
    """The state of an optimized program, read once on the driver, or None for the default prompts."""

    state: dict[str, Any] | None
    label: str

    @classmethod
    def load(cls, directory: str | Path, file_name: str) -> ProgramSource:
        path = Path(directory) / file_name
        if not path.is_file():
            return cls(None, f"default prompts ({path} not found)")
        data = path.read_bytes()
        return cls(json.loads(data), program_label(path, data))


def program_label(path: Path, data: bytes) -> str:
    """How reports and manifests name a program file: its path and the start of its sha256."""
    return f"{path} (sha256 {hashlib.sha256(data).hexdigest()[:12]})"


@dataclass(frozen=True)
class StageConfig:
    """What every actor of a stage is built from; small and picklable (the key stays a SecretStr)."""

    settings: Settings
    program: ProgramSource
    in_flight: int = 8
    threads: int | None = None
    limiter: RayLimiterRef | None = None  # the run's shared limiter, when --rpm, --tpm or --max-cost is set
    # Whether this stage stops at --max-cost: the first stage does; later ones finish the rows it started.
    refuse_at_ceiling: bool = True


@dataclass
class RowOutcome:
    values: dict[str, str | None]
    error: str | None = None
    review: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Answer:
    """A validated answer and how many answers it took to get it."""

    values: dict[str, str]
    attempts: int = 1


class InvalidAnswer(Exception):
    """The LM answered, but not with values the signature allows."""


class _WaitRetryAfter(wait_base):
    """Exponential backoff with jitter, but never sooner than the provider's Retry-After."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: Any) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = getattr(exc, "retry_after", None)
        if isinstance(hint, int | float) and hint > 0:
            return float(hint) * (1 + 0.1 * random.random())
        return self.fallback(retry_state)


def validation_problems(
    values: dict[str, Any], signature: type[dspy.Signature], may_be_empty: frozenset[str]
) -> list[str]:
    """What is wrong with an answer: a missing field, an empty one, a value outside its Literal set."""
    problems = []
    for name, output in signature.output_fields.items():
        value = values.get(name)
        choices = literal_choices(output.annotation)
        if value is None:
            problems.append(f"`{name}` is missing")
        elif not isinstance(value, str):
            problems.append(f"`{name}` is not text")
        elif choices is not None and value not in choices:
            problems.append(f"`{name}` must be exactly one of {', '.join(choices)}; got {value[:60]!r}")
        elif not value.strip() and name not in may_be_empty:
            problems.append(f"`{name}` is empty")
    return problems


class Stage:
    """Runs one DSPy module per row of a Ray Data batch. Subclasses only declare what to run."""

    name: ClassVar[str]
    module_class: ClassVar[type[dspy.Module]]
    signature: ClassVar[type[dspy.Signature]]
    program_file: ClassVar[str]
    may_be_empty: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        config: StageConfig,
        *,
        lm_setup: LMSetup | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = config.settings
        self.setup = lm_setup or build_lm(config.settings, threads=config.threads)
        self.program = self.module_class()
        if config.program.state is not None:
            self.program.load_state(config.program.state)
        self.program.use_demos(config.settings.demos)
        fixed = None if self.program.demos_vary else len(self.program.predictors()[0].demos)
        self.setup = with_prompt_cache(self.setup, config.settings, fixed)
        self.in_flight = config.in_flight
        self._semaphore: asyncio.Semaphore | None = None
        self._sleep = sleep
        self._secrets = [config.settings.api_key.get_secret_value()] if config.settings.api_key else []
        if limiter is None:
            limiter = (
                config.limiter.connect(sleep=sleep, refusable=config.refuse_at_ceiling) if config.limiter else NoLimit()
            )
        self.limiter = limiter
        # Each request's cost is counted against --max-cost (by the run's limiter actor) when it is set.
        self._prices = prices(config.settings.model) if config.settings.max_cost is not None else None
        self._prompt_chars = self._fixed_prompt_chars()
        logger.info("%s stage: model %s, program %s", self.name, self.settings.model, config.program.label)

    @classmethod
    def output_fields(cls) -> tuple[str, ...]:
        return tuple(cls.signature.output_fields)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["transcript", "errors"]).to_pylist()
        outcomes = await asyncio.gather(*(self._triage_row(row) for row in rows))
        return self._merge(batch, outcomes)

    async def _triage_row(self, row: dict[str, Any]) -> RowOutcome:
        if row["transcript"] is None:  # the reader found no usable transcript: no LM call
            return RowOutcome(values={})
        if row["errors"] and CEILING_ERROR in row["errors"]:  # an earlier stage stopped at --max-cost
            return RowOutcome(values={})
        with track_usage() as usage:
            try:
                answer = await self.answer(row["transcript"])
                outcome = RowOutcome(values=answer.values, review=self.review(row["transcript"], answer))
            except Exception as exc:  # every failure becomes the row's error; nothing escapes to Ray
                outcome = RowOutcome(values={}, error=self._describe(exc))
        for counts in usage.get_total_tokens().values():
            outcome.prompt_tokens += int(counts.get("prompt_tokens") or 0)
            outcome.completion_tokens += int(counts.get("completion_tokens") or 0)
            outcome.cached_prompt_tokens += cached_tokens(counts)
        return outcome

    def review(self, transcript: str, answer: Answer) -> list[str]:
        """Reasons a human should check this answer, whichever stage gave it (`triage.review`): an
        answer outside the program's per-call bound, one not taken from the call, validation retries."""
        choices = self.program.nearest.neighbourhood(transcript).choices
        reasons = bound_reasons(answer.values, choices) + grounding_reasons(answer.values, transcript)
        return reasons + attempts_reason(answer.attempts)

    async def answer(self, transcript: str) -> Answer:
        """The validated output fields for one transcript.

        An answer that does not validate is asked again with the reason appended to the
        request (up to `validation_attempts` answers); each request on its own is retried
        on transient errors (429, 5xx, timeouts, connection resets) with exponential
        backoff and jitter, honouring Retry-After (up to `max_retries` times).
        """
        feedback = None
        for attempt in range(1, self.settings.validation_attempts + 1):
            try:
                prediction = await self._request(transcript, self.setup.adapter(feedback))
            except AdapterParseError as exc:
                problems = [f"the answer could not be parsed ({first_line(exc)})"]
            else:
                values = {name: prediction.get(name) for name in self.signature.output_fields}
                problems = validation_problems(values, self.signature, self.may_be_empty)
                if not problems:
                    return Answer(values, attempt)
            feedback = self._feedback(problems)
        raise InvalidAnswer(
            f"no valid answer after {self.settings.validation_attempts} attempts: {'; '.join(problems)}"
        )

    async def _request(self, transcript: str, adapter: dspy.ChatAdapter) -> dspy.Prediction:
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_retryable_lm_error),
            wait=_WaitRetryAfter(wait_exponential_jitter(multiplier=0.5, max=30.0)),
            stop=stop_after_attempt(self.settings.max_retries + 1),
            sleep=self._sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                async with self._request_slot():
                    return await self._limited_call(transcript, adapter)
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _limited_call(self, transcript: str, adapter: dspy.ChatAdapter) -> dspy.Prediction:
        """One LM request, booked against the run's rate limit (every retry and every validation attempt too)."""
        estimate = estimate_tokens(self._prompt_chars + len(transcript), EXPECTED_COMPLETION_TOKENS)
        await self.limiter.acquire(estimate)
        before = _usage_so_far()
        try:
            # No call history: DSPy keeps up to 10,000 calls per LM (prompts, demos and answers
            # included), which nothing here reads; measured, 1,477 -> 1,268 MB peak over 10,000 rows.
            with dspy.context(lm=self.setup.lm, adapter=adapter, disable_history=True):
                return await self.program.acall(transcript=transcript)
        except LMRateLimitError as exc:
            await self.limiter.penalize(exc.retry_after)
            raise
        finally:
            prompt, completion, cached = (now - then for now, then in zip(_usage_so_far(), before, strict=True))
            if prompt or completion:
                await self.limiter.settle(estimate, prompt + completion)
                if self._prices is not None:
                    await self.limiter.spend(self._prices.cost(prompt, completion, cached))

    def _fixed_prompt_chars(self) -> int:
        """Characters of the prompt around the transcript (instructions, demos), for token estimates."""
        predictor = self.program.predictors()[0]
        demos = self.program.nearest.demos("") or predictor.demos  # nearest demos: a typical set
        messages = self.setup.adapter().format(predictor.signature, demos, {"transcript": ""})
        return sum(len(str(m.get("content", ""))) for m in messages)

    def _request_slot(self) -> asyncio.Semaphore:
        # Created on first use: it must belong to the event loop Ray Data calls us from.
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.in_flight)
        return self._semaphore

    def _feedback(self, problems: list[str]) -> str:
        rules = [
            f"`{name}` must be exactly one of: {', '.join(choices)}"
            for name, field in self.signature.output_fields.items()
            if (choices := literal_choices(field.annotation))
        ]
        return (
            "Your previous answer was rejected: " + "; ".join(problems) + ". "
            "Answer again with every output field, in the required format. " + ". ".join(rules)
        ).strip()

    def _describe(self, exc: Exception) -> str:
        text = redact(f"{type(exc).__name__}: {first_line(exc)}", self._secrets)
        return f"{self.name}: {text}"[:MAX_ERROR_CHARS]

    def _merge(self, batch: pa.Table, outcomes: list[RowOutcome]) -> pa.Table:
        columns = {name: batch.column(name) for name in batch.column_names}
        for name in self.output_fields():
            columns[name] = pa.array([o.values.get(name) for o in outcomes], pa.string())
        columns["review"] = pa.array(
            [join_reasons(old, o.review) for old, o in zip(batch.column("review").to_pylist(), outcomes, strict=True)],
            pa.string(),
        )
        columns["errors"] = pa.array(
            [join_reasons(old, o.error) for old, o in zip(batch.column("errors").to_pylist(), outcomes, strict=True)],
            pa.string(),
        )
        for name in ("prompt_tokens", "completion_tokens", "cached_prompt_tokens"):
            spent = [getattr(o, name) for o in outcomes]
            before = batch.column(name).to_pylist() if name in columns else [0] * len(outcomes)
            columns[name] = pa.array([(old or 0) + new for old, new in zip(before, spent, strict=True)], pa.int64())
        now = datetime.now(UTC)
        columns["triaged_at"] = pa.array([now] * len(outcomes), pa.timestamp("us", tz="UTC"))
        return pa.table([columns[name] for name in WORKING_SCHEMA.names], schema=WORKING_SCHEMA)


def _usage_so_far() -> tuple[int, int, int]:
    """(prompt, completion, cached prompt) tokens counted so far by the row's usage tracker (see `_triage_row`)."""
    tracker = dspy.settings.usage_tracker
    if tracker is None:
        return 0, 0, 0
    totals = list(tracker.get_total_tokens().values())
    return (
        sum(int(c.get("prompt_tokens") or 0) for c in totals),
        sum(int(c.get("completion_tokens") or 0) for c in totals),
        sum(cached_tokens(c) for c in totals),
    )


def cached_tokens(usage: dict[str, Any]) -> int:
    """Prompt tokens the provider read from its prompt cache, in DSPy's usage record (0 when not reported)."""
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0


class TriageStage(Stage):
    """Priority, category and summary (`CallTriager`); a second opinion on the priority for review."""

    name = "triage"
    module_class = CallTriager
    signature = TriageCall
    program_file = "triager.json"

    def __init__(self, config: StageConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        # A classifier on the program's labelled demo pool (absent without one): fitted once per actor.
        self.second_opinion = self.program.nearest.classifier("priority") if self.program.nearest.pool else None
        for label in self.program.nearest.embedded if self.second_opinion else ():
            self.program.nearest.classifier(label)  # the sentence embedder loads here, not on the first call

    def evidence(self, transcript: str) -> dict[str, dict[str, float]]:
        """What the labelled calls say of this call's priority: the classifier's probabilities, the
        shares of its `NEIGHBOURS` most similar calls and the second reader's probabilities (sentence
        embeddings; {} each without a labelled pool, the last also for a program that reads none)."""
        if self.second_opinion is None:
            return {"second_opinion": {}, "neighbours": {}, "second_reader": {}}
        return {
            "second_opinion": self.program.nearest.probabilities(transcript, "priority"),
            "neighbours": self.program.nearest.shares(transcript, "priority", NEIGHBOURS),
            "second_reader": self.program.nearest.reader_probabilities(transcript, "priority"),
        }

    def review(self, transcript: str, answer: Answer) -> list[str]:
        evidence = self.evidence(transcript)
        priority = answer.values["priority"]
        choices = self.program.nearest.neighbourhood(transcript).choices
        reasons = urgent_first(
            choice_reasons(priority, choices)
            + cue_reasons(priority, transcript)
            + priority_reasons(priority, evidence["second_opinion"], evidence["neighbours"])
            + reader_reasons(priority, evidence["second_reader"])
        )
        return reasons + super().review(transcript, answer)


class ExtractDetailsStage(Stage):
    """Location and subject description (`DetailExtractor`)."""

    name = "extract_details"
    module_class = DetailExtractor
    signature = ExtractDetails
    program_file = "detail_extractor.json"
    may_be_empty = frozenset({"location", "subject_description"})
