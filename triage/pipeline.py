"""The run: read -> triage stage -> details stage -> write, streamed through Ray Data.

The driver lists the input files, checks their headers, and streams once over the rows to
learn their call_ids (ids only: duplicates, rows already done). Reading, both stages and the
Parquet writer run as streaming Ray tasks and actor pools, so the driver never holds the
transcripts. Output is committed in whole part files (`triage.sink`): a run killed at any
moment is resumed by running it again.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from triage.cost import check_cost_ceiling, estimated_cost, split_refused, usd
from triage.errors import ConfigError
from triage.inputs import InputScan, check_input_file, resolve_input_files, scan_inputs
from triage.local import is_local_model
from triage.manifest import now_iso, package_versions, write_manifest
from triage.progress import Progress
from triage.ratelimit import get_or_create_limiter
from triage.settings import PROVIDER_KEY_VARIABLES, Settings
from triage.sink import PartWriter, completed_ids, prepare_output_folder, read_output
from triage.source import TranscriptSource
from triage.stages import ExtractDetailsStage, ProgramSource, Stage, StageConfig, TriageStage

logger = logging.getLogger("triage")

STAGES: tuple[type[Stage], ...] = (TriageStage, ExtractDetailsStage)
READ_CPUS = 0.25
# What the stages add to a row (reasoning is not kept; summary, location, ...), for block sizes.
ANSWER_BYTES_PER_ROW = 400
# Ray Data tasks one actor of a hosted-model stage runs at once, on its one event loop and under
# its one request budget: while one task's last rows are still waiting on the provider, the
# next tasks' rows already take the free request slots (see `target_block_bytes`).
TASKS_PER_ACTOR = 8
# Environment every Ray worker needs; never secrets (runtime_env values land in Ray's logs).
WORKER_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class RunSummary:
    rows_in: int
    skipped: int
    triaged: int
    rows_out: int
    rows_with_errors: int
    rows_to_review: int
    duplicates: int
    seconds: float
    output: str
    left_at_ceiling: int = 0  # rows not triaged because the spend reached --max-cost
    max_cost: float | None = None
    batch: str = ""  # --batch: the jobs, their tokens and cost; with jobs still running, how to collect them
    pending: bool = False

    def line(self) -> str:
        if self.pending:
            return self.batch
        batch = f"; {self.batch}" if self.batch else ""
        duplicates = f", {self.duplicates} duplicate call_ids made unique" if self.duplicates else ""
        stopped = (
            f"; stopped at --max-cost {usd(self.max_cost or 0)} with {self.left_at_ceiling} rows left: run the same "
            "command again to triage them (it estimates what is left, and --max-cost must allow it)"
            if self.left_at_ceiling
            else ""
        )
        return (
            f"{self.rows_in} rows in, {self.skipped} skipped as already done, {self.triaged} triaged, "
            f"{self.rows_out} rows out, {self.rows_with_errors} with errors, {self.rows_to_review} to review"
            f"{duplicates}, "
            f"{self.seconds:.1f}s -> {self.output}{stopped}{batch}"
        )


@dataclass(frozen=True)
class PoolPlan:
    """Actors and per-actor request budget for one stage."""

    actors: int
    in_flight: int
    num_cpus: float
    threads: int | None
    tasks_per_actor: int = 1


def plan_pools(settings: Settings, cpus: float) -> list[PoolPlan]:
    """Share the in-flight budget between the stages and their actors.

    A hosted model is waiting on the network: actors take a fraction of a CPU so both
    pools fit on a 2-core machine, and `--concurrency` requests are split between the
    stages (their sum never exceeds it). The embedded model computes: one actor per stage,
    one request at a time, each with an equal share of the cores as llama.cpp threads.
    """
    if is_local_model(settings.model):
        # The reservation leaves room for the read tasks (else they wait forever behind the actors);
        # the llama.cpp threads use each actor's whole share of the cores.
        reserve = (cpus - READ_CPUS) / len(STAGES)
        threads = max(1, int(cpus // len(STAGES)))
        return [PoolPlan(actors=1, in_flight=1, num_cpus=min(1.0, reserve), threads=threads) for _ in STAGES]
    budgets = [
        settings.concurrency // len(STAGES) + (1 if i < settings.concurrency % len(STAGES) else 0)
        for i in range(len(STAGES))
    ]
    if min(budgets) < 1:
        raise ConfigError(f"--concurrency must be at least {len(STAGES)} (one request in flight per stage)")
    actors = [max(1, min(4, math.ceil(budget / 32))) for budget in budgets]
    num_cpus = min(0.25, (cpus - READ_CPUS) / sum(actors))
    return [
        PoolPlan(actors=n, in_flight=budget // n, num_cpus=num_cpus, threads=None, tasks_per_actor=TASKS_PER_ACTOR)
        for n, budget in zip(actors, budgets, strict=True)
    ]


def init_ray(*, verbose: bool = False) -> None:
    """Local Ray by default; the existing cluster at RAY_ADDRESS when set. Quiet unless `verbose`."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    runtime_env: dict[str, Any] | None = None
    if address:
        # Remote workers get the package itself; settings and programs travel with the actors.
        runtime_env = {"env_vars": dict(WORKER_ENV), "py_modules": [str(Path(__file__).resolve().parent)]}
    else:
        # A local cluster's workers inherit the driver's environment. A runtime_env would make
        # Ray start fresh workers for it (seconds each on a small machine) instead of its idle ones.
        for name, value in WORKER_ENV.items():
            os.environ.setdefault(name, value)
    ray.init(
        # "local": always a new local cluster. Without it, ray.init() silently joins any cluster
        # started on this machine with `ray start` (it reads /tmp/ray/ray_current_cluster).
        address=address or "local",
        runtime_env=runtime_env,
        include_dashboard=False,
        logging_level=logging.INFO if verbose else logging.ERROR,
        log_to_driver=verbose,
    )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not verbose:
        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)


def stop_ray() -> None:
    """Shut Ray down now, if this process started or joined it.

    The command line calls this once the run is over: left to the interpreter's exit hooks,
    the same shutdown took several seconds longer, after the summary was already printed.
    """
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def run(settings: Settings, *, verbose: bool = False) -> RunSummary:
    """Triage every row of `settings.input` into the Parquet dataset at `settings.output`.

    Rows whose call_id the output already holds are skipped (resume); `settings.overwrite`
    starts the output afresh. A manifest of the run is written beside the output.
    """
    started, started_at = time.monotonic(), now_iso()
    if settings.batch:
        from triage.batch import check_batch_model

        check_batch_model(settings)
    check_credentials(settings)
    files = resolve_input_files(settings.input)
    for file in files:
        check_input_file(file)
    output = Path(settings.output)
    prepare_output_folder(output, overwrite=settings.overwrite)
    scan = scan_inputs(files, settings.limit)
    done = completed_ids(output)
    skipped = sum(1 for call_id in scan.call_ids if call_id in done)
    if scan.duplicates:
        logger.warning(
            "%d call_ids appear more than once in the input; each such row gets <call_id>@<file>:<row>",
            len(scan.duplicates),
        )

    programs = {stage.name: ProgramSource.load(settings.optimized_dir, stage.program_file) for stage in STAGES}
    tally = Tally()
    if skipped < scan.rows:
        estimate = check_cost_ceiling(  # before anything is sent
            settings, files, scan, done, STAGES, programs, batch=settings.batch
        )
        if estimate is not None:
            logger.info("estimated cost %s, within --max-cost %s", estimate.describe(), usd(settings.max_cost or 0))
    if skipped < scan.rows and settings.batch:
        from triage.batch import triage_in_batches

        tally = triage_in_batches(settings, files, scan, done, programs, verbose=verbose)
    elif skipped < scan.rows:
        tally = _triage(settings, files, scan, done, programs, verbose=verbose)
        if estimate is not None and tally.ceiling is not None:
            tally.ceiling["estimated_usd"] = estimate.usd

    table = read_output(output, ["errors", "review"])
    summary = RunSummary(
        scan.rows,
        skipped,
        tally.rows,
        table.num_rows,
        table.num_rows - table.column("errors").null_count,
        table.num_rows - table.column("review").null_count,
        len(scan.duplicates),
        time.monotonic() - started,
        str(output),
        tally.left_at_ceiling,
        settings.max_cost,
        batch=tally.batch["summary"] if tally.batch else "",
        pending=bool(tally.batch and tally.batch["pending"]),
    )
    write_manifest(
        output,
        {
            "input": settings.input,
            "input_files": [str(f) for f in files],
            "output": str(output),
            "rows": {
                "in": summary.rows_in,
                "skipped_as_done": summary.skipped,
                "triaged": summary.triaged,
                "out": summary.rows_out,
                "with_errors": summary.rows_with_errors,
                "to_review": summary.rows_to_review,
                "errors_this_run": tally.errors,
                "duplicate_call_ids": summary.duplicates,
            },
            "model": settings.model,
            "programs": {name: source.label for name, source in programs.items()},
            "started": started_at,
            "finished": now_iso(),
            "seconds": round(summary.seconds, 3),
            "tokens": {
                "prompt": tally.prompt_tokens,
                "completion": tally.completion_tokens,
                "cached_prompt": tally.cached_prompt_tokens,  # a part of "prompt", read from the provider's cache
            },
            "estimated_cost_usd": (
                tally.batch["estimated_cost_usd"]["total"]
                if tally.batch
                else estimated_cost(
                    settings.model, tally.prompt_tokens, tally.completion_tokens, tally.cached_prompt_tokens
                )
            ),
            "cost_ceiling": tally.ceiling,
            "rate_limit": tally.rate_limit,
            **({"batch": tally.batch} if tally.batch else {}),
            "settings": settings.describe(),
            "versions": package_versions(),
        },
    )
    return summary


@dataclass
class Tally:
    """What this run wrote, counted on the driver as batches arrive."""

    rows: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    rate_limit: dict[str, Any] | None = None  # the shared limiter's counters, when --rpm or --tpm is set
    left_at_ceiling: int = 0  # rows refused because the spend reached --max-cost (not written)
    ceiling: dict[str, Any] | None = None  # --max-cost and the spend the limiter counted, when set
    batch: dict[str, Any] | None = None  # --batch: the manifest's batch section (triage.batch.runner)
    written: list[str] = field(default_factory=list)  # --batch: call_ids written by this run

    def add(self, batch: pa.Table) -> tuple[int, int]:
        errors = batch.num_rows - batch.column("errors").null_count
        tokens = [pc.sum(batch.column(name)).as_py() or 0 for name in ("prompt_tokens", "completion_tokens")]
        self.rows += batch.num_rows
        self.errors += errors
        self.prompt_tokens += tokens[0]
        self.completion_tokens += tokens[1]
        if "cached_prompt_tokens" in batch.column_names:
            self.cached_prompt_tokens += pc.sum(batch.column("cached_prompt_tokens")).as_py() or 0
        return errors, sum(tokens)


def _triage(
    settings: Settings,
    files: list[Path],
    scan: InputScan,
    done: set[str],
    programs: dict[str, ProgramSource],
    *,
    verbose: bool,
) -> Tally:
    """Run the Ray Data pipeline, committing part files from the driver as batches stream in."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    init_ray(verbose=verbose)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    plans = plan_pools(settings, cpus)
    to_do = frozenset(call_id for call_id in scan.call_ids if call_id not in done)
    block_rows = rows_per_block(plans)
    block_bytes = target_block_bytes(settings, files, scan.rows, block_rows)
    ray.data.DataContext.get_current().target_max_block_size = block_bytes
    source = TranscriptSource(
        files,
        model=settings.model,
        duplicates=scan.duplicates,
        to_do=to_do,
        max_chars=settings.max_transcript_chars,
        rows_per_block=block_rows,
    )
    # Reading is light: a fraction of a CPU, so it never waits behind the stage actors on small nodes.
    ds = ray.data.read_datasource(source, num_cpus=READ_CPUS)
    # The driver holds the limiter's handle for the whole run: Ray removes the actor with it.
    limiter = (
        get_or_create_limiter(uuid.uuid4().hex[:12], settings.rpm, settings.tpm, max_cost=settings.max_cost)
        if (settings.rpm or settings.tpm or settings.max_cost)
        else None
    )
    for index, (stage, plan) in enumerate(zip(STAGES, plans, strict=True)):
        program = programs[stage.name]
        logger.log(
            logging.INFO if verbose else logging.DEBUG,
            "%s stage: %d actor(s) x %d request(s) in flight, program %s",
            stage.name,
            plan.actors,
            plan.in_flight,
            program.label,
        )
        config = StageConfig(
            settings=settings,
            program=program,
            in_flight=plan.in_flight,
            threads=plan.threads,
            limiter=limiter,
            refuse_at_ceiling=index == 0,  # the rows the first stage started are finished, not wasted
        )
        ds = ds.map_batches(
            stage,
            fn_constructor_kwargs={"config": config},
            batch_format="pyarrow",
            batch_size=max(1, plan.in_flight),
            compute=ActorPoolStrategy(size=plan.actors, max_concurrent_calls_per_actor=plan.tasks_per_actor),
            num_cpus=plan.num_cpus,
        )
    writer = PartWriter(
        settings.output, rows_per_file=rows_per_file(settings), seconds_per_file=settings.commit_seconds
    )
    progress = Progress(len(to_do))
    tally = Tally()
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            batch, refused = split_refused(batch)  # rows the ceiling stopped are left for the next run
            tally.left_at_ceiling += refused
            writer.add(batch)
            progress.update(batch.num_rows, *tally.add(batch))
    finally:
        writer.close()  # commit what arrived, even when interrupted
        progress.close()
    if limiter is not None:
        stats = ray.get(limiter.handle().stats.remote())
        if settings.rpm or settings.tpm:
            tally.rate_limit = rate_limit_summary(stats)
        if settings.max_cost:
            tally.ceiling = {
                "max_cost_usd": settings.max_cost,
                "spent_usd": round(stats["spent_usd"], 6),
                "requests_refused": stats["refused"],
                "rows_left": tally.left_at_ceiling,
            }
    return tally


def rate_limit_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of the limiter's counters: the limits, requests booked, 429s and waits."""
    return {
        "rpm": stats.get("rpm"),
        "tpm": stats.get("tpm"),
        "requests": stats.get("requests"),
        "429s": stats.get("penalties"),
        "rate_decreases": stats.get("decreases"),
        "waited_seconds_total": round(float(stats.get("waited_total") or 0.0), 3),
        "waited_seconds_max": round(float(stats.get("waited_max") or 0.0), 3),
    }


def rows_per_block(plans: list[PoolPlan]) -> int:
    return max(4, min(plan.in_flight for plan in plans))


def target_block_bytes(settings: Settings, files: list[Path], rows: int, block_rows: int) -> int:
    """Ray Data's `target_max_block_size` for a run: blocks of one batch of rows, not of thousands.

    Ray Data gathers what a task outputs (the read's blocks included) until it exceeds this
    size, 128 MiB by default, and a stage hands a block on only when it is complete. With
    the default, a 100,000-row benchmark run moved in blocks of about 8,300 rows: each stage
    task ran for over a minute before the next stage or the driver saw a row. Even blocks of
    ~500 rows left the details stage idle for the triage stage's first block and the triage
    stage idle while the details stage worked through the last one: in a 6,000-row run the
    two stages overlapped for about 42 s of 60 (CPU of each actor sampled every 2 s). Here a
    block is one batch (row size estimated from the input files plus the answers), and each actor
    runs `TASKS_PER_ACTOR` such tasks at once, so a task's tail of slow requests does not
    leave the actor's request slots idle. Measured with `scripts/bench.py` over 10,000 rows:
    ~500-row blocks one task at a time 85.2 rows/s end to end, 104.4 steady; one-batch
    blocks with 8 tasks per actor 93.5 and 116.4.
    The embedded model takes seconds per row, so each of its rows is handed on alone.
    """
    if is_local_model(settings.model):
        return 1  # every block is sliced to single rows
    input_bytes = sum(file.stat().st_size for file in files)
    per_row = input_bytes / max(1, rows) + ANSWER_BYTES_PER_ROW
    return max(1, int(block_rows * per_row))


def rows_per_file(settings: Settings) -> int:
    """Rows a part file collects before it is committed: what a crash can cost, at most, per writer.

    The embedded model takes seconds per row, so its files are committed after a few rows.
    """
    return 8 if is_local_model(settings.model) else 1000


def check_credentials(settings: Settings) -> None:
    """Fail before starting when a provider we know has no key anywhere (else every row would fail).

    Settings already took the provider's variable from the environment or `.env`.
    """
    if is_local_model(settings.model) or settings.api_key is not None or settings.api_base:
        return
    variable = PROVIDER_KEY_VARIABLES.get(settings.provider)
    if variable:
        raise ConfigError(
            f"no API key for {settings.model}: set TRIAGE_API_KEY or {variable} in the environment or in .env"
        )
