"""The run: read -> triage stage -> details stage -> write, streamed through Ray Data.

The driver lists the input files and checks their headers; reading, both stages and the
Parquet writer run as streaming Ray tasks and actor pools, so the driver never holds the
dataset. The dataset is written to a temporary folder beside the output and moved into
place at the end: a failed run leaves the previous output as it was.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from triage.errors import ConfigError
from triage.inputs import check_input_file, count_rows, read_rows, resolve_input_files
from triage.local_model import is_local_model
from triage.schema import OUTPUT_SCHEMA
from triage.settings import PROVIDER_KEY_VARIABLES, Settings
from triage.stages import INPUT_ERROR_PREFIX, ExtractDetailsStage, ProgramSource, Stage, StageConfig, TriageStage

logger = logging.getLogger("triage")

STAGES: tuple[type[Stage], ...] = (TriageStage, ExtractDetailsStage)
# Environment every Ray worker needs; never secrets (runtime_env values land in Ray's logs).
WORKER_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class RunSummary:
    rows_in: int
    rows_out: int
    rows_with_errors: int
    seconds: float
    output: str

    def line(self) -> str:
        return (
            f"{self.rows_in} rows in, {self.rows_out} rows out, {self.rows_with_errors} with errors, "
            f"{self.seconds:.1f}s -> {self.output}"
        )


@dataclass(frozen=True)
class PoolPlan:
    """Actors and per-actor request budget for one stage."""

    actors: int
    in_flight: int
    num_cpus: float
    threads: int | None


def plan_pools(settings: Settings, cpus: float) -> list[PoolPlan]:
    """Share the in-flight budget between the stages and their actors.

    A hosted model is waiting on the network: actors take a fraction of a CPU so both
    pools fit on a 2-core machine, and `--concurrency` requests are split between the
    stages (their sum never exceeds it). The embedded model computes: one actor per stage,
    one request at a time, each with an equal share of the cores as llama.cpp threads.
    """
    if is_local_model(settings.model):
        share = max(1.0, cpus / len(STAGES))
        return [
            PoolPlan(actors=1, in_flight=1, num_cpus=min(share, cpus / len(STAGES)), threads=int(share)) for _ in STAGES
        ]
    budgets = [
        settings.concurrency // len(STAGES) + (1 if i < settings.concurrency % len(STAGES) else 0)
        for i in range(len(STAGES))
    ]
    plans = []
    for budget in budgets:
        budget = max(budget, 1)
        actors = max(1, min(4, math.ceil(budget / 32)))
        plans.append(PoolPlan(actors=actors, in_flight=max(1, budget // actors), num_cpus=0.25, threads=None))
    return plans


def _read_file(item: dict[str, Any], *, model: str) -> list[dict[str, Any]]:
    rows = []
    for record in read_rows(Path(item["path"])):
        problem = record.pop("input_error")
        rows.append(
            {
                "call_id": record["call_id"],
                "transcript": record["transcript"],
                "errors": f"{INPUT_ERROR_PREFIX}{problem}" if problem else None,
                "model": model,
                "prompt_tokens": 0,
                "completion_tokens": 0,
            }
        )
    return rows


def _to_output_schema(batch: pa.Table) -> pa.Table:
    columns = []
    for field in OUTPUT_SCHEMA:
        if field.name in batch.column_names:
            columns.append(batch.column(field.name).cast(field.type))
        elif field.name == "triaged_at":
            columns.append(pa.array([datetime.now(UTC)] * batch.num_rows, field.type))
        else:
            columns.append(pa.nulls(batch.num_rows, field.type))
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def init_ray(settings: Settings, *, verbose: bool = False) -> None:
    """Local Ray by default; the existing cluster at RAY_ADDRESS when set. Quiet unless `verbose`."""
    import ray

    if ray.is_initialized():
        return
    if not verbose:
        # The core worker's C++ log lines (e.g. about constructor arguments) go straight to stderr.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    address = os.environ.get("RAY_ADDRESS")
    runtime_env: dict[str, Any] = {"env_vars": dict(WORKER_ENV)}
    if address:
        # Remote workers get the package itself; settings and programs travel with the actors.
        runtime_env["py_modules"] = [str(Path(__file__).resolve().parent)]
    ray.init(
        address=address or None,
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


def run(settings: Settings, *, verbose: bool = False) -> RunSummary:
    """Triage every row of `settings.input` into a Parquet dataset at `settings.output`."""
    started = time.monotonic()
    output = Path(settings.output)
    _check_replaceable(output)
    check_credentials(settings)
    files = resolve_input_files(settings.input)
    for file in files:
        check_input_file(file)
    rows_in = count_rows(files)
    if settings.limit is not None:
        rows_in = min(rows_in, settings.limit)

    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    init_ray(settings, verbose=verbose)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    ds = ray.data.from_items([{"path": str(f.resolve())} for f in files], override_num_blocks=len(files))
    ds = ds.flat_map(_read_file, fn_kwargs={"model": settings.model})
    if settings.limit is not None:
        ds = ds.limit(settings.limit)
    ds = ds.map_batches(_to_output_schema, batch_format="pyarrow", batch_size=None)
    for stage, plan in zip(STAGES, plan_pools(settings, cpus), strict=True):
        program = ProgramSource.load(settings.optimized_dir, stage.program_file)
        logger.info(
            "%s stage: %d actor(s) x %d request(s) in flight, program %s",
            stage.name,
            plan.actors,
            plan.in_flight,
            program.label,
        )
        config = StageConfig(settings=settings, program=program, in_flight=plan.in_flight, threads=plan.threads)
        ds = ds.map_batches(
            stage,
            fn_constructor_kwargs={"config": config},
            batch_format="pyarrow",
            batch_size=max(1, plan.in_flight),
            compute=ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.num_cpus,
        )

    staging = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        ds.write_parquet(str(staging))
        if not staging.exists():  # no rows: still leave a readable, empty dataset
            staging.mkdir(parents=True)
            import pyarrow.parquet as pq

            pq.write_table(OUTPUT_SCHEMA.empty_table(), staging / "empty.parquet")
        _replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    table = pads.dataset(output, format="parquet", schema=OUTPUT_SCHEMA).to_table(columns=["errors"])
    errors = table.num_rows - table.column("errors").null_count
    return RunSummary(rows_in, table.num_rows, errors, time.monotonic() - started, str(output))


def check_credentials(settings: Settings) -> None:
    """Fail before starting when a provider we know has no key anywhere (else every row would fail).

    `resolve_settings` already took the provider's variable from the environment or `.env`.
    """
    if is_local_model(settings.model) or settings.api_key is not None or settings.api_base:
        return
    variable = PROVIDER_KEY_VARIABLES.get(settings.provider)
    if variable:
        raise ConfigError(
            f"no API key for {settings.model}: set TRIAGE_API_KEY or {variable} in the environment or in .env"
        )


def _check_replaceable(output: Path) -> None:
    """Refuse to replace a folder that holds anything but a Parquet dataset (a typo must not delete data)."""
    if output.is_file():
        raise ConfigError(f"output {output} is a file; give a folder for the Parquet dataset")
    if output.is_dir():
        strangers = [p.name for p in output.iterdir() if p.suffix != ".parquet" and not p.name.startswith((".", "_"))]
        if strangers:
            raise ConfigError(
                f"output folder {output} holds files that are not Parquet ({', '.join(strangers[:3])}); "
                "choose another --output"
            )


def _replace_folder(new: Path, target: Path) -> None:
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
