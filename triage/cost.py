"""What a run costs: prices per token (online, batch, cached reads) and the estimate made before a run.

Prices come from the price list bundled with DSPy (LiteLLM's, read through DSPy: importing
LiteLLM itself costs seconds). Where the list has no batch or cached-read price, the providers'
published discounts stand in: batch jobs at 50% of the online price (OpenAI's Batch API,
Anthropic's Message Batches); a prompt token read from the provider's prompt cache at 10% of
the input price (Anthropic) or 50% (OpenAI).

The estimate before a run (`estimate_run`) renders the prompts of a sample of the rows to do
with the same programs and adapter the stages use, counts their tokens as characters / 4 (the
rule of thumb `triage.ratelimit` also books with; no tokenizer is loaded), and adds an
allowance for each answer: the completion tokens per call that `optimize` measured (its
report.json, `optimizer_usage`), else `DEFAULT_COMPLETION_TOKENS`. It counts one request per
row and stage: answers asked again because they did not validate, and retries, come on top.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage.errors import ConfigError
from triage.ratelimit import CHARS_PER_TOKEN, CostCeilingReached

if TYPE_CHECKING:
    import pyarrow as pa

    from triage.inputs import InputScan
    from triage.settings import Settings
    from triage.stages import ProgramSource, Stage

BATCH_SHARE = 0.5  # a batch job's price, as a share of the online price
CACHED_READ_SHARE = {"anthropic": 0.1, "openai": 0.5}  # a cached prompt token, as a share of the input price
BATCH_PROVIDERS = frozenset({"openai", "anthropic"})
DEFAULT_COMPLETION_TOKENS = 150  # per request, when optimize's report has no measurement
SAMPLE_ROWS = 200  # rows whose prompts are rendered for the estimate
# The error a row gets when the run's spend reached --max-cost before its first request was sent.
CEILING_ERROR = CostCeilingReached.__name__


def usd(value: float) -> str:
    """Dollars for a message: cents, or two significant digits below a cent ($0.0001, not $0.00)."""
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.2g}"


@dataclass(frozen=True)
class Prices:
    """USD per token: prompt, completion, and a prompt token read from the provider's cache."""

    input: float
    output: float
    cached_input: float

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """`prompt_tokens` includes the `cached_tokens` read from the cache (as providers report them)."""
        cached = min(cached_tokens, prompt_tokens)
        return (prompt_tokens - cached) * self.input + cached * self.cached_input + completion_tokens * self.output


def prices(model: str, *, batch: bool = False) -> Prices | None:
    """The prices of `model` (a DSPy model string) online or in a batch job; None when unknown.

    The embedded model costs nothing. A provider without a batch API has no batch price.
    """
    from triage.local import is_local_model
    from triage.settings import split_model

    if is_local_model(model):
        return Prices(0.0, 0.0, 0.0)
    provider, name = split_model(model)
    if not name or (batch and provider not in BATCH_PROVIDERS):
        return None
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # the bundled list, no download
    from dspy.clients.model_metadata import model_info

    entry = model_info(provider, name)
    if entry.get("input_cost_per_token") is None:
        return None

    def rate(key: str, fallback: float) -> float:
        if batch and entry.get(f"{key}_batches") is not None:
            return float(entry[f"{key}_batches"])
        if entry.get(key) is not None:
            return float(entry[key]) * (BATCH_SHARE if batch else 1.0)
        return fallback

    input_price = rate("input_cost_per_token", 0.0)
    return Prices(
        input=input_price,
        output=rate("output_cost_per_token", 0.0),
        cached_input=rate("cache_read_input_token_cost", input_price * CACHED_READ_SHARE.get(provider, 1.0)),
    )


def price_per_token(model: str) -> tuple[float, float] | None:
    """(input, output) USD per token online, or None when the price list does not know the model."""
    found = prices(model)
    return None if found is None else (found.input, found.output)


def estimated_cost(
    model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, *, batch: bool = False
) -> float | None:
    found = prices(model, batch=batch)
    if found is None:
        return None
    return round(found.cost(prompt_tokens, completion_tokens, cached_tokens), 6)


# ─── Before a run ───────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class CostEstimate:
    rows: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    usd: float
    batch: bool = False

    def describe(self) -> str:
        return (
            f"{usd(self.usd)} for {self.rows} rows ({self.requests} requests, ~{self.prompt_tokens} prompt and "
            f"~{self.completion_tokens} completion tokens at the {'batch' if self.batch else 'online'} price)"
        )


def check_cost_ceiling(
    settings: Settings,
    files: Sequence[Path],
    scan: InputScan,
    done: set[str],
    stages: Sequence[type[Stage]],
    programs: Mapping[str, ProgramSource],
    *,
    batch: bool = False,
) -> CostEstimate | None:
    """Refuse (ConfigError, one line) to start a run whose estimate is above `settings.max_cost`.

    Also refuses when the model has no known price: the ceiling could not be enforced. Returns the
    estimate (None when no ceiling is set).
    """
    if settings.max_cost is None:
        return None
    found = prices(settings.model, batch=batch)
    if found is None:
        raise ConfigError(
            f"--max-cost / TRIAGE_MAX_COST cannot be enforced: {settings.model} has no "
            f"{'batch ' if batch else ''}price in DSPy's price list"
        )
    to_do = frozenset(call_id for call_id in scan.call_ids if call_id not in done)
    estimate = estimate_run(settings, files, scan, to_do, stages, programs, found, batch=batch)
    if estimate.usd > settings.max_cost:
        raise ConfigError(
            f"estimated cost {estimate.describe()} is above --max-cost {usd(settings.max_cost)}; "
            "raise it, or triage fewer rows with --limit"
        )
    return estimate


def estimate_run(
    settings: Settings,
    files: Sequence[Path],
    scan: InputScan,
    to_do: frozenset[str],
    stages: Sequence[type[Stage]],
    programs: Mapping[str, ProgramSource],
    found: Prices,
    *,
    batch: bool = False,
) -> CostEstimate:
    """The run's cost: every row to do, one request per stage, prompts rendered as the stages render them."""
    rows, transcript_chars, sample = 0, 0, []
    for transcript in _transcripts(settings, files, scan, to_do):
        rows += 1
        transcript_chars += len(transcript)
        if len(sample) < SAMPLE_ROWS:
            sample.append(transcript)
    if found == Prices(0.0, 0.0, 0.0) or not rows:
        return CostEstimate(rows, rows * len(stages), 0, 0, 0.0, batch)
    completion = completion_allowance(settings.optimized_dir)
    prompt_tokens = completion_tokens = 0
    for stage in stages:
        program = programs[stage.name]
        overhead = sum(prompt_chars(stage, program, t, settings.demos) - len(t) for t in sample) / len(sample)
        prompt_tokens += math.ceil((transcript_chars + rows * overhead) / CHARS_PER_TOKEN)
        completion_tokens += rows * completion.get(stage.name, DEFAULT_COMPLETION_TOKENS)
    usd = found.cost(prompt_tokens, completion_tokens)
    return CostEstimate(rows, rows * len(stages), prompt_tokens, completion_tokens, round(usd, 6), batch)


def _transcripts(settings: Settings, files: Sequence[Path], scan: InputScan, to_do: frozenset[str]) -> Iterator[str]:
    """The transcripts the stages will be sent (cut as the reader cuts them), streamed from the input."""
    from triage.source import prepared_rows

    for file in files:
        for row in prepared_rows(
            file,
            model=settings.model,
            duplicates=scan.duplicates,
            to_do=to_do,
            max_chars=settings.max_transcript_chars,
        ):
            if row["transcript"] is not None:
                yield row["transcript"]


_MODULES: dict[tuple[str, str], Any] = {}


def prompt_chars(stage: type[Stage], program: ProgramSource, transcript: str, demos: str = "program") -> int:
    """Characters of the messages the stage's program sends for `transcript` (demos and instructions included)."""
    from triage.lm import ChatAdapter

    key = (stage.name, program.label, demos)
    module = _MODULES.get(key)
    if module is None:
        module = _MODULES[key] = stage.module_class()
        if program.state is not None:
            module.load_state(program.state)
        module.use_demos(demos)
    predictor = module.predictors()[0]
    demos = module.nearest.demos(transcript) if module.nearest.active else predictor.demos
    messages = ChatAdapter().format(predictor.signature, demos, {"transcript": transcript})
    return sum(len(str(message.get("content", ""))) for message in messages)


def completion_allowance(optimized_dir: str | Path) -> dict[str, int]:
    """Completion tokens per call for each stage, as `optimize` measured them (its report.json), if it did."""
    path = Path(optimized_dir) / "report.json"
    try:
        usage = json.loads(path.read_text()).get("optimizer_usage") or {}
        return {
            name: math.ceil(counts["completion_tokens"] / counts["calls"])
            for name, counts in usage.items()
            if counts.get("calls")
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


# ─── During a run ───────────────────────────────────────────────────────────────────────────────


def split_refused(batch: pa.Table) -> tuple[pa.Table, int]:
    """The rows of `batch` that were done, and how many were refused because the ceiling was reached."""
    import pyarrow.compute as pc

    refused = pc.fill_null(pc.match_substring(batch.column("errors"), f": {CEILING_ERROR}"), False)
    count = pc.sum(refused).as_py() or 0
    return (batch.filter(pc.invert(refused)) if count else batch), count
