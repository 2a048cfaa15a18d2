"""`run --batch` on the driver: render -> plan and submit -> wait -> collect -> parse -> write.

Rendering and parsing are Ray Data stages (a cluster runs them in parallel); submitting and
polling happen here only, through `BatchClient`. The ledger (`triage.batch.ledger`) is written
before anything waits on a job, so the same command run again (after Ctrl-C, SIGKILL, a reboot,
or `--no-wait`) collects the jobs it finds there and submits only rows in none of them; rows
already in the output are skipped as in an online run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from triage.batch.client import BatchClient, SubmitRefused
from triage.batch.collect import (
    BATCH_STAGES,
    BATCH_TOKEN_COLUMNS,
    RETRY_PREFIX,
    CollectOptions,
    answers_table,
    job_answers,
)
from triage.batch.engine import request_from_json
from triage.batch.ledger import JobRecord, Ledger
from triage.batch.plan import JobLimits, PlannedRequest, Planner
from triage.batch.render import RenderConfig, RenderRequests
from triage.cost import estimated_cost, prices
from triage.errors import TriageError
from triage.inputs import InputScan
from triage.manifest import now_iso
from triage.progress import Progress
from triage.settings import Settings
from triage.sink import PartWriter
from triage.source import TranscriptSource
from triage.stages import ProgramSource, StageConfig

logger = logging.getLogger("triage")

RENDER_BATCH_ROWS = 64
MAX_RENDER_ACTORS = 16


@dataclass
class BatchRun:
    """What the driver learns along the way, for the summary and the manifest."""

    submitted: list[str] = field(default_factory=list)  # job ids submitted by this run
    collected: dict[str, dict[tuple[str, str], dict[str, Any]]] = field(default_factory=dict)  # job id -> answers
    prompt_tokens: int = 0  # tokens of batch answers used by the rows written
    completion_tokens: int = 0
    held_back: int = 0


def triage_in_batches(
    settings: Settings,
    files: list[Path],
    scan: InputScan,
    done: set[str],
    programs: dict[str, ProgramSource],
    *,
    verbose: bool,
) -> Any:
    """The batch counterpart of `pipeline._triage`: returns its `Tally`, with the batch section filled in."""
    import ray

    from triage.pipeline import Tally, init_ray

    init_ray(verbose=verbose)
    output = Path(settings.output)
    client = BatchClient(settings)
    ledger = Ledger(output)
    if settings.overwrite:
        _forget_all(ledger, client)
    ledger.check_model(settings.model)
    _reattach(ledger, client)
    remaining = {call_id for call_id in scan.call_ids if call_id not in done}
    state = BatchRun()
    tally = Tally()
    progress = Progress(len(remaining), label="batch")
    cpus = float(ray.cluster_resources().get("CPU", 1))
    fresh = remaining - ledger.rows_in_jobs()
    if fresh:
        _render_and_submit(settings, files, scan, programs, ledger, client, state, fresh, None, cpus, progress)
    pending = None
    rounds = 0
    while remaining:
        unfinished = [job for job in ledger.jobs if not job.terminal and job.call_ids & remaining]
        if unfinished:
            _wait(settings, ledger, client, unfinished, progress, wait=not settings.no_wait)
            if any(not job.terminal for job in unfinished):
                pending = _pending_line(settings, ledger, remaining)
                break
        rounds += 1
        final = rounds >= settings.validation_attempts  # no row is held back for ever
        retry = _collect(
            settings, files, scan, programs, ledger, client, state, tally, remaining, cpus, progress, final=final
        )
        remaining -= set(tally.written)
        if not retry:
            break
        _render_and_submit(settings, files, scan, programs, ledger, client, state, set(retry), retry, cpus, progress)
    progress.close()
    tally.batch = _batch_section(settings, ledger, state, tally, pending)
    return tally


# ─── ledger upkeep ──────────────────────────────────────────────────────────────────────────────


def _forget_all(ledger: Ledger, client: BatchClient) -> None:
    """--overwrite: jobs of the earlier run are cancelled where still running, and forgotten."""
    for job in list(ledger.jobs):
        if job.id and not job.terminal:
            try:
                client.cancel(job.id)
                logger.warning("--overwrite: cancelled batch job %s of the earlier run", job.id)
            except TriageError as exc:
                logger.warning("--overwrite: could not cancel batch job %s: %s", job.id, exc)
        ledger.forget(job)


def _reattach(ledger: Ledger, client: BatchClient) -> None:
    """A job planned but never given an id (cut off in the submit call): found by its label, or planned again."""
    for job in [job for job in ledger.jobs if job.id is None]:
        found = client.find(job.label)
        if found is None:
            ledger.forget(job)  # its rows are in no job now: rendered and submitted again
            continue
        job.id, job.status, job.submitted_at = found.id, found.status, found.created_at or now_iso()
        ledger.save(job)


# ─── render, plan, submit ───────────────────────────────────────────────────────────────────────


def _render_and_submit(
    settings: Settings,
    files: list[Path],
    scan: InputScan,
    programs: dict[str, ProgramSource],
    ledger: Ledger,
    client: BatchClient,
    state: BatchRun,
    rows: set[str],
    only: dict[str, dict[str, str]] | None,
    cpus: float,
    progress: Progress,
) -> None:
    """Render `rows` (only the stages in `only`, with their feedback, for a retry round) into new jobs."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from triage.pipeline import READ_CPUS, STAGES

    round_ = ledger.rounds + 1
    ray.data.DataContext.get_current().target_max_block_size = None  # Ray's default: blocks of whole batches
    source = _source(settings, files, scan, rows, RENDER_BATCH_ROWS)
    config = RenderConfig(settings, STAGES, programs, only=[ray.put(only)] if only is not None else None)
    actors = max(1, min(MAX_RENDER_ACTORS, int((cpus - READ_CPUS) / 0.5)))
    ds = ray.data.read_datasource(source, num_cpus=READ_CPUS).map_batches(
        RenderRequests,
        fn_constructor_kwargs={"config": config},
        batch_format="pyarrow",
        batch_size=RENDER_BATCH_ROWS,
        compute=ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=0.5,
    )
    planner = Planner(JobLimits.for_settings(settings))
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows_and_requests = zip(batch.column("call_id").to_pylist(), batch.column("requests").to_pylist(), strict=True)
        for call_id, requests in rows_and_requests:
            planned = [
                PlannedRequest(call_id, r["stage"], r["request"], r["sha"], r["feedback"]) for r in json.loads(requests)
            ]
            for job in planner.add_row(planned):
                _submit(settings, ledger, client, state, job.requests, round_, progress)
    for job in planner.finish():
        _submit(settings, ledger, client, state, job.requests, round_, progress)
    if planner.too_large:
        logger.warning("%d rows are too large for a batch job; they are answered online", len(planner.too_large))


def _source(settings: Settings, files: list[Path], scan: InputScan, rows: set[str], block_rows: int) -> Any:
    return TranscriptSource(
        files,
        model=settings.model,
        duplicates=scan.duplicates,
        to_do=frozenset(rows),
        max_chars=settings.max_transcript_chars,
        rows_per_block=block_rows,
    )


def _submit(
    settings: Settings,
    ledger: Ledger,
    client: BatchClient,
    state: BatchRun,
    requests: list[PlannedRequest],
    round_: int,
    progress: Progress,
) -> JobRecord:
    """Record the job in the ledger, submit it, record its id: the id is on disk before anything waits on it."""
    job = ledger.new_job(settings.model, round_, [(r.call_id, r.stage, r.sha, r.feedback) for r in requests])
    try:
        info = client.submit([request_from_json(r.request) for r in requests], job.label)
    except SubmitRefused:
        ledger.forget(job)  # refused outright: there is no job to find on a rerun
        raise
    job.id, job.status, job.submitted_at = info.id, info.status, now_iso()
    ledger.save(job)
    state.submitted.append(info.id)
    logger.info("submitted batch job %s: %d requests, %d rows", info.id, len(requests), len(job.call_ids))
    _show(ledger, progress)
    return job


# ─── wait ───────────────────────────────────────────────────────────────────────────────────────


def _wait(
    settings: Settings,
    ledger: Ledger,
    client: BatchClient,
    jobs: list[JobRecord],
    progress: Progress,
    *,
    wait: bool,
) -> None:
    """Poll `jobs` until every one is terminal (once only without `wait`), recording each end in the ledger."""
    while True:
        for job in jobs:
            if job.terminal or job.id is None:
                continue
            info = client.status(job.id)
            if info.status != job.status:
                job.status = info.status
                ledger.save(job)
        _show(ledger, progress)
        if not wait or all(job.terminal for job in jobs):
            return
        time.sleep(settings.batch_poll_seconds)


def _show(ledger: Ledger, progress: Progress) -> None:
    jobs = [job for job in ledger.jobs if job.id]
    running = sum(1 for job in jobs if not job.terminal)
    progress.label = f"batch jobs: {len(jobs)} submitted, {running} running, {len(jobs) - running} done; written"
    progress.update(0)


def _pending_line(settings: Settings, ledger: Ledger, remaining: set[str]) -> str:
    jobs = [job for job in ledger.jobs if job.id and not job.terminal and job.call_ids & remaining]
    ids = ", ".join(job.id for job in jobs if job.id)
    rows = len(set().union(*(job.call_ids for job in jobs)) & remaining)
    return (
        f"submitted: {len(jobs)} batch job(s) ({ids}) hold {rows} rows; "
        f"run the same command again to collect them into {settings.output}"
    )


# ─── collect and parse ──────────────────────────────────────────────────────────────────────────


def _collect(
    settings: Settings,
    files: list[Path],
    scan: InputScan,
    programs: dict[str, ProgramSource],
    ledger: Ledger,
    client: BatchClient,
    state: BatchRun,
    tally: Any,
    remaining: set[str],
    cpus: float,
    progress: Progress,
    *,
    final: bool,
) -> dict[str, dict[str, str]]:
    """Parse and write every remaining row not waiting on a job; the rows held back for a new round."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from triage.pipeline import READ_CPUS, STAGES, plan_pools, rows_per_block, rows_per_file, target_block_bytes

    answers: dict[tuple[str, str], dict[str, Any]] = {}
    for job in sorted(ledger.jobs, key=lambda job: job.seq):
        if job.id and job.terminal and job.call_ids & remaining:
            answers.update(_answers_of(job, client, state))
    waiting = set().union(*(job.call_ids for job in ledger.jobs if not job.terminal))
    rows = remaining - waiting
    if not rows:
        return {}
    plans = plan_pools(settings, cpus)
    block_rows = rows_per_block(plans)
    ray.data.DataContext.get_current().target_max_block_size = target_block_bytes(
        settings, files, scan.rows, block_rows
    )
    options = CollectOptions(
        [ray.put(answers_table(answers))], settings.batch_retry, settings.validation_attempts, final=final
    )
    ds = ray.data.read_datasource(_source(settings, files, scan, rows, block_rows), num_cpus=READ_CPUS)
    for stage, plan in zip(STAGES, plans, strict=True):
        config = StageConfig(settings=settings, program=programs[stage.name], in_flight=plan.in_flight)
        ds = ds.map_batches(
            BATCH_STAGES[stage],
            fn_constructor_kwargs={"config": config, "options": options},
            batch_format="pyarrow",
            batch_size=max(1, plan.in_flight),
            compute=ActorPoolStrategy(size=plan.actors, max_concurrent_calls_per_actor=plan.tasks_per_actor),
            num_cpus=plan.num_cpus,
        )
    writer = PartWriter(
        settings.output, rows_per_file=rows_per_file(settings), seconds_per_file=settings.commit_seconds
    )
    retry: dict[str, dict[str, str]] = {}
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            held = _held_back(batch, retry)
            ready = batch.filter(pc.invert(held)) if held is not None else batch
            writer.add(ready)
            state.prompt_tokens += pc.sum(ready.column(BATCH_TOKEN_COLUMNS[0])).as_py() or 0
            state.completion_tokens += pc.sum(ready.column(BATCH_TOKEN_COLUMNS[1])).as_py() or 0
            tally.written.extend(ready.column("call_id").to_pylist())
            progress.update(ready.num_rows, *tally.add(ready))
    finally:
        writer.close()
    state.held_back = len(retry)
    return retry


def _answers_of(job: JobRecord, client: BatchClient, state: BatchRun) -> dict[tuple[str, str], dict[str, Any]]:
    """A terminal job's answers, fetched once per run (a job that failed whole may have none to fetch)."""
    assert job.id is not None
    if job.id not in state.collected:
        try:
            entries: tuple[Any, ...] = client.results(job.id)
        except TriageError as exc:
            logger.warning("batch job %s (%s): no results (%s); its rows are answered again", job.id, job.status, exc)
            entries = ()
        state.collected[job.id] = job_answers(job, entries)
    return state.collected[job.id]


def _held_back(batch: pa.Table, retry: dict[str, dict[str, str]]) -> pa.Array | None:
    """Rows some stage held back for a new batch round (`--batch-retry batch`), noted in `retry`."""
    columns = [name for name in batch.column_names if name.startswith(RETRY_PREFIX)]
    if not columns:
        return None
    ids = batch.column("call_id").to_pylist()
    held = [False] * batch.num_rows
    for name in columns:
        for i, feedback in enumerate(batch.column(name).to_pylist()):
            if feedback is not None:
                retry.setdefault(ids[i], {})[name.removeprefix(RETRY_PREFIX)] = feedback
                held[i] = True
    return pa.array(held)


# ─── summary ────────────────────────────────────────────────────────────────────────────────────


def _batch_section(
    settings: Settings, ledger: Ledger, state: BatchRun, tally: Any, pending: str | None
) -> dict[str, Any]:
    """The manifest's `batch` section; its `summary` is what the run's summary line adds."""
    batch_prices, online_prices = prices(settings.model, batch=True), prices(settings.model)
    factor = (
        round(batch_prices.input / online_prices.input, 4)
        if batch_prices and online_prices and online_prices.input
        else None
    )
    online_prompt = max(0, tally.prompt_tokens - state.prompt_tokens)
    online_completion = max(0, tally.completion_tokens - state.completion_tokens)
    batch_cost = estimated_cost(settings.model, state.prompt_tokens, state.completion_tokens, batch=True)
    online_cost = estimated_cost(settings.model, online_prompt, online_completion)
    total = None if batch_cost is None or online_cost is None else round(batch_cost + online_cost, 6)
    jobs = [
        {"id": job.id, "status": job.status, "round": job.round, "requests": len(job.keys), "rows": len(job.call_ids)}
        for job in ledger.jobs
    ]
    ids = ", ".join(job["id"] for job in jobs if job["id"]) or "none"
    cost = f"${total:.4f}" if total is not None else "unknown cost"
    return {
        "pricing": (
            f"batch answers at {factor:.0%} of the online price" if factor is not None else "batch price unknown"
        )
        + ", answers sent again online at the full price",
        "price_factor": factor,
        "jobs": jobs,
        "submitted_this_run": state.submitted,
        "tokens": {"prompt": state.prompt_tokens, "completion": state.completion_tokens},
        "online_tokens": {"prompt": online_prompt, "completion": online_completion},
        "estimated_cost_usd": {"batch": batch_cost, "online": online_cost, "total": total},
        "pending": pending,
        "summary": pending
        or f"batch jobs {ids}; {state.prompt_tokens + state.completion_tokens} tokens at the batch price, "
        f"{online_prompt + online_completion} online, {cost}",
    }
