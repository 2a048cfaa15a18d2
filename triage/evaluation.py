"""Measure both programs on a labeled file: the numbers a user needs before trusting a model.

Each call goes through the pipeline's own stages (`TriageStage.predict`, `ExtractDetailsStage.predict`):
the same LM construction (`build_lm`), adapter, validation retries and transient-error retries
as `python -m triage run`, so the report describes what the pipeline will do. A call whose
answer never validates counts as wrong (and as a miss for urgent recall); it never stops the run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback
from dspy.utils.usage_tracker import track_usage

from triage.atomic import atomic_write_texts
from triage.baselines import score_baselines
from triage.errors import InputError, first_line, redact
from triage.lm import LMSetup, build_lm
from triage.local import is_local_model
from triage.metrics import FAILED, INVALID, ReviewScores, Scores, percent, score_calls, score_review
from triage.programs import CATEGORIES, NEAREST_DEMOS_KEY, PRIORITIES
from triage.review import join_reasons
from triage.settings import Settings
from triage.stages import ExtractDetailsStage, ProgramSource, Stage, StageConfig, TriageStage

logger = logging.getLogger("triage")

LABEL_FIELDS = ("transcript", "priority", "category", "location", "subject_description")
MODULES: dict[str, type[Stage]] = {stage.name: stage for stage in (TriageStage, ExtractDetailsStage)}
MAX_LISTED_FAILURES = 10


# ─── Labeled data ────────────────────────────────────────────────────────────────────────────────


def load_labeled(path: str | Path, limit: int | None = None) -> list[dspy.Example]:
    """The labeled calls of a JSONL file as Examples with `transcript` as input, in file order.

    Every line must be a JSON object with a transcript, a valid priority and category, and
    location / subject_description strings (empty when the call gives none).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"labeled file {path} does not exist")
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise InputError(f"labeled file {path}, line {number}: not valid JSON") from None
            problem = _label_problem(row)
            if problem:
                raise InputError(f"labeled file {path}, line {number}: {problem}")
            values = {name: row[name] for name in LABEL_FIELDS}
            values["call_id"] = str(row.get("call_id") or f"{path.name}:{number}")
            examples.append(dspy.Example(**values).with_inputs("transcript"))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise InputError(f"labeled file {path} holds no calls")
    return examples


def _label_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [name for name in LABEL_FIELDS if not isinstance(row.get(name), str)]
    if missing:
        return f"missing or not text: {', '.join(missing)}"
    if not row["transcript"].strip():
        return "empty transcript"
    if row["priority"] not in PRIORITIES:
        return f"priority must be one of {', '.join(PRIORITIES)}; got {row['priority']!r}"
    if row["category"] not in CATEGORIES:
        return f"category must be one of {', '.join(CATEGORIES)}; got {row['category']!r}"
    return None


# ─── LM usage ───────────────────────────────────────────────────────────────────────────────────


@dataclass
class Usage:
    """LM requests made (cache hits and failed requests included) and tokens billed (cache hits cost none)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    def describe(self) -> str:
        return f"{self.calls} LM calls, {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens"


class _CallCounter(BaseCallback):
    """Counts finished LM calls; DSPy calls it from worker threads and event loops alike."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        with self._lock:
            self.calls += 1


@contextmanager
def metered() -> Iterator[Usage]:
    """Count the LM calls and tokens of everything run inside the block (threads and tasks included).

    The Usage it yields is filled in when the block exits.
    """
    usage = Usage()
    counter = _CallCounter()
    with track_usage() as tracker, dspy.context(callbacks=[*dspy.settings.get("callbacks", []), counter]):
        try:
            yield usage
        finally:
            usage.calls = counter.calls
            for totals in tracker.get_total_tokens().values():
                usage.prompt_tokens += int(totals.get("prompt_tokens") or 0)
                usage.completion_tokens += int(totals.get("completion_tokens") or 0)


# ─── Running the stages over labeled calls ───────────────────────────────────────────────────────


@dataclass
class ModuleRun:
    """One module over every call: its answers (None where it failed), failures, cost and time."""

    program: str
    predictions: list[dict[str, str] | None]
    reviews: list[list[str]] = field(default_factory=list)  # per call: reasons to doubt the answer
    opinions: list[dict[str, dict[str, float]]] = field(default_factory=list)  # per call: what the labelled calls say
    failures: list[tuple[str, str]] = field(default_factory=list)  # (call_id, error)
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0


def concurrency_for(settings: Settings) -> int:
    """Requests in flight: the embedded model answers one at a time; a hosted one gets --concurrency."""
    return 1 if is_local_model(settings.model) else settings.concurrency


def run_module(
    stage_class: type[Stage],
    settings: Settings,
    setup: LMSetup,
    program: ProgramSource,
    examples: Sequence[dspy.Example],
    *,
    title: str = "",
) -> ModuleRun:
    """Predict every example with one stage, `concurrency_for(settings)` calls at a time."""
    config = StageConfig(settings=settings, program=program, in_flight=concurrency_for(settings))
    stage = stage_class(config, lm_setup=setup)
    secrets = [settings.api_key.get_secret_value()] if settings.api_key else []
    run = ModuleRun(
        program=program.label,
        predictions=[None] * len(examples),
        reviews=[[] for _ in range(len(examples))],
        opinions=[{} for _ in range(len(examples))],
    )
    step = max(5, -(-len(examples) // 10))
    done = 0
    name = title or stage_class.name

    async def one(index: int, example: dspy.Example) -> None:
        nonlocal done
        try:
            answer = await stage.answer(example.transcript)
            run.predictions[index] = answer.values
            run.reviews[index] = stage.review(example.transcript, answer)
            if hasattr(stage, "evidence"):
                run.opinions[index] = stage.evidence(example.transcript)
        except Exception as exc:  # a failed call is scored as wrong; the run goes on
            text = f"{type(exc).__name__}: {first_line(exc)}"
            run.failures.append((example.call_id, redact(text, secrets)[:300]))
        done += 1
        if done % step == 0 or done == len(examples):
            logger.info("  %s: %d/%d calls, %d failed", name, done, len(examples), len(run.failures))

    async def everything() -> None:
        await asyncio.gather(*(one(i, example) for i, example in enumerate(examples)))

    started = time.monotonic()
    with metered() as usage:
        asyncio.run(everything())
    run.usage, run.seconds = usage, time.monotonic() - started
    return run


# ─── The report ─────────────────────────────────────────────────────────────────────────────────


@dataclass
class EvaluationReport:
    """Scores of both programs on one labeled file, with what it took to get them."""

    model: str
    data_file: str
    n: int
    programs: dict[str, str]
    scores: Scores
    review: ReviewScores
    baselines: dict[str, Scores]  # trivial answers on the same calls (`triage.baselines`)
    usage: dict[str, Usage]
    seconds: float
    failures: list[dict[str, str]] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)  # per call: gold labels and both answers
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def total_usage(self) -> Usage:
        return sum(self.usage.values(), Usage())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scores"] = self.scores.to_dict()
        data["review"] = self.review.to_dict()
        data["baselines"] = {name: scores.to_dict() for name, scores in self.baselines.items()}
        data["usage"] = {name: asdict(u) for name, u in self.usage.items()} | {"total": asdict(self.total_usage)}
        return data

    def line(self) -> str:
        s = self.scores
        return (
            f"{self.n} calls: priority {percent(s.priority_accuracy)}, category {percent(s.category_accuracy)}, "
            f"urgent recall {percent(s.urgent_recall)}, under-triage {s.under_triage}, "
            f"location {percent(s.location_match)}, subject {percent(s.subject_match)}; "
            f"review {percent(self.review.rate)} of calls, catching {self.review.wrong_priority_flagged}/"
            f"{self.review.wrong_priority} wrong priorities and {self.review.under_triaged_flagged}/"
            f"{self.review.under_triaged} under-triaged"
        )

    def write(self, path: str | Path) -> tuple[Path, Path]:
        """Write the report as `<path>.md` and `<path>.json`."""
        return write_evaluation_report(path, self.to_markdown(), self.to_dict())

    def to_markdown(self, title: str | None = None) -> str:
        lines = [f"# {title or 'Evaluation'}", "", *self.header_lines(), "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in metric_rows(self)]
        lines += ["", *baseline_section(self), "", *confusion_sections(self.scores)]
        if self.failures:
            lines += ["", "## Failed predictions (counted as wrong)", ""]
            lines += [f"- {f['call_id']} ({f['module']}): {f['error']}" for f in self.failures[:MAX_LISTED_FAILURES]]
            if len(self.failures) > MAX_LISTED_FAILURES:
                lines.append(f"- ... and {len(self.failures) - MAX_LISTED_FAILURES} more (see the JSON report)")
        return "\n".join(lines) + "\n"

    def header_lines(self) -> list[str]:
        return [
            f"- Data: `{self.data_file}` ({self.n} calls)",
            f"- Model: `{self.model}`",
            f"- Triage program: {self.programs['triage']}",
            f"- Details program: {self.programs['extract_details']}",
            f"- Run: {self.created_at}, {self.seconds:.0f} s",
        ]


def metric_rows(report: EvaluationReport) -> list[tuple[str, str]]:
    """(metric, value) rows shared by the evaluation and optimization reports."""
    s, r, usage = report.scores, report.review, report.usage
    return [
        ("priority accuracy", percent(s.priority_accuracy)),
        ("category accuracy", percent(s.category_accuracy)),
        ("urgent recall", f"{percent(s.urgent_recall)} ({s.urgent_found}/{s.urgent_total})"),
        ("under-triage (predicted less urgent than gold)", str(s.under_triage)),
        ("over-triage (predicted more urgent than gold)", str(s.over_triage)),
        ("location match", percent(s.location_match)),
        ("subject match", percent(s.subject_match)),
        ("triage metric (optimizer's score)", percent(s.triage_score)),
        ("details metric (optimizer's score)", percent(s.details_score)),
        ("review queue (calls flagged)", f"{percent(r.rate)} ({r.flagged}/{r.n})"),
        ("wrong priorities flagged", f"{r.wrong_priority_flagged}/{r.wrong_priority}"),
        ("under-triaged calls flagged", f"{r.under_triaged_flagged}/{r.under_triaged}"),
        ("locations not in the transcript (flagged)", f"{r.ungrounded_locations} ({r.ungrounded_locations_flagged})"),
        (
            "summaries naming what the transcript does not (flagged)",
            f"{r.ungrounded_summaries} ({r.ungrounded_summaries_flagged})",
        ),
        ("failed predictions (triage / extract_details)", f"{s.triage_failed} / {s.details_failed}"),
        ("LM calls (triage / extract_details)", f"{usage['triage'].calls} / {usage['extract_details'].calls}"),
        ("tokens, prompt + completion", f"{report.total_usage.prompt_tokens} + {report.total_usage.completion_tokens}"),
        ("seconds", f"{report.seconds:.0f}"),
    ]


def baseline_section(report: EvaluationReport) -> list[str]:
    """The LM beside the trivial baselines on the same calls."""
    lines = [
        "## Against trivial baselines (same calls)",
        "",
        "| answers | priority | category | urgent recall |",
        "|---|---|---|---|",
    ]
    rows = [(f"this program ({report.model})", report.scores), *report.baselines.items()]
    lines += [
        f"| {name} | {percent(s.priority_accuracy)} | {percent(s.category_accuracy)} | {percent(s.urgent_recall)} |"
        for name, s in rows
    ]
    if not report.baselines:
        lines += ["", "(no labelled pool in the programs: baselines not computed)"]
    return lines


def confusion_markdown(matrix: dict[str, dict[str, int]]) -> list[str]:
    """A confusion matrix as a Markdown table: rows gold, columns predicted; empty extra columns left out."""
    if not matrix:
        return ["(not measured)"]
    columns = [
        c for c in next(iter(matrix.values())) if c not in (INVALID, FAILED) or any(row[c] for row in matrix.values())
    ]
    lines = ["| gold \\ predicted | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {gold} | " + " | ".join(str(row[c]) for c in columns) + " |" for gold, row in matrix.items()]
    return lines


def confusion_sections(scores: Scores, suffix: str = "") -> list[str]:
    return [
        f"## Priority confusion{suffix}",
        "",
        *confusion_markdown(scores.priority_confusion),
        "",
        f"## Category confusion{suffix}",
        "",
        *confusion_markdown(scores.category_confusion),
    ]


def write_evaluation_report(path: str | Path, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """Write `<stem>.md` and `<stem>.json` beside each other (a path ending in .json or .md names either)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".md", ".json") else path
    md_path, json_path = stem.with_suffix(".md"), stem.with_suffix(".json")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_texts({md_path: markdown, json_path: json.dumps(data, indent=2, ensure_ascii=False) + "\n"})
    return md_path, json_path


# ─── Entry points ───────────────────────────────────────────────────────────────────────────────


def evaluate_programs(
    settings: Settings,
    examples: Sequence[dspy.Example],
    data_file: str,
    programs: dict[str, ProgramSource],
    *,
    lm_setup: LMSetup | None = None,
    title: Callable[[str], str] = str,
    baseline_pool: Sequence[dict[str, Any]] | None = None,
) -> EvaluationReport:
    """Run `programs` ({"triage": ..., "extract_details": ...}, keyed like MODULES) over `examples` and score them.

    The baselines use `baseline_pool` (labelled calls), by default the triage program's nearest-demo pool.
    """
    setup = lm_setup or build_lm(settings)
    started = time.monotonic()
    runs = {
        name: run_module(stage_class, settings, setup, programs[name], examples, title=title(name))
        for name, stage_class in MODULES.items()
    }
    triaged, details = runs["triage"], runs["extract_details"]
    scores = score_calls(examples, triaged.predictions, details.predictions)
    reviews = [join_reasons(t, d) for t, d in zip(triaged.reviews, details.reviews, strict=True)]
    review = score_review(examples, [e.transcript for e in examples], triaged.predictions, details.predictions, reviews)
    if baseline_pool is None:
        baseline_pool = ((programs["triage"].state or {}).get(NEAREST_DEMOS_KEY) or {}).get("pool", [])
    failures = [
        {"call_id": call_id, "module": name, "error": error}
        for name, run in runs.items()
        for call_id, error in run.failures
    ]
    return EvaluationReport(
        model=settings.model,
        data_file=data_file,
        n=len(examples),
        programs={name: run.program for name, run in runs.items()},
        scores=scores,
        review=review,
        baselines=score_baselines(examples, baseline_pool),
        usage={name: run.usage for name, run in runs.items()},
        seconds=time.monotonic() - started,
        failures=failures,
        calls=[
            {
                "call_id": example.call_id,
                "gold": {name: example[name] for name in LABEL_FIELDS if name != "transcript"},
                **{name: run.predictions[i] for name, run in runs.items()},
                "review": reviews[i],
                "second_opinion": triaged.opinions[i].get("second_opinion") or None,
                "neighbours": triaged.opinions[i].get("neighbours") or None,
                "second_reader": triaged.opinions[i].get("second_reader") or None,
            }
            for i, example in enumerate(examples)
        ],
    )


def load_programs(programs_dir: str | Path) -> dict[str, ProgramSource]:
    """The optimized programs in a folder, or the default prompts for each one that is missing."""
    return {name: ProgramSource.load(programs_dir, stage_class.program_file) for name, stage_class in MODULES.items()}


def evaluate(
    settings: Settings,
    labeled_path: str | Path,
    programs_dir: str | Path | None = None,
    *,
    limit: int | None = None,
    lm_setup: LMSetup | None = None,
) -> EvaluationReport:
    """Score the programs in `programs_dir` (default: `settings.optimized_dir`) on a labeled JSONL file."""
    examples = load_labeled(labeled_path, limit)
    programs = load_programs(settings.optimized_dir if programs_dir is None else programs_dir)
    logger.info("evaluate: %d calls from %s with %s", len(examples), labeled_path, settings.model)
    return evaluate_programs(settings, examples, str(labeled_path), programs, lm_setup=lm_setup)
