"""The job ledger: which batch jobs hold which rows, kept in the output folder beside the parts.

One small JSON file per job, `_batch-job-<seq>.json` (a leading "_" keeps pyarrow and the
sink's checks away from it), written atomically (`triage.atomic`) at each step of the job's
life: planned (before the provider hears of it), submitted (its id, before anything waits on
it), terminal (its final status). A rerun of the same command reads these files and collects
the jobs instead of submitting their rows again: a crash at any moment after the id was written
costs no second payment. The one window left is the submit call itself: a job planned but
without an id is looked up by its label (OpenAI keeps it) and otherwise planned again.

`keys[i]` is the row and stage of request `i`; lm15 sends request `i` with `custom_id` "i" and
gives answers back by it, so `custom_id` ties every answer to its row and stage.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from triage.atomic import atomic_write_text
from triage.errors import ConfigError

PREFIX = "_batch-job-"


@dataclass
class JobRecord:
    seq: int
    model: str
    round: int
    keys: list[tuple[str, str, str, str | None]]  # (call_id, stage, request sha, feedback) per request
    label: str = field(default_factory=lambda: f"triage-{uuid.uuid4().hex[:16]}")
    id: str | None = None
    status: str = "planned"  # then lm15's BatchStatus: queued, running, ... completed, failed, cancelled, expired
    submitted_at: str | None = None

    @property
    def call_ids(self) -> set[str]:
        return {key[0] for key in self.keys}

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed", "cancelled", "expired")

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.seq:05d}.json"


class Ledger:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.jobs: list[JobRecord] = []
        for path in sorted(folder.glob(f"{PREFIX}*.json")):
            data = json.loads(path.read_text(encoding="utf-8"))
            data["keys"] = [tuple(key) for key in data["keys"]]
            self.jobs.append(JobRecord(**data))

    def check_model(self, model: str) -> None:
        others = {job.model for job in self.jobs} - {model}
        if others:
            raise ConfigError(
                f"output folder {self.folder} holds batch jobs for {', '.join(sorted(others))}; "
                "rerun with that --model to collect them, or --overwrite to start afresh"
            )

    def new_job(self, model: str, round_: int, keys: list[tuple[str, str, str, str | None]]) -> JobRecord:
        seq = max((job.seq for job in self.jobs), default=0) + 1
        job = JobRecord(seq=seq, model=model, round=round_, keys=keys)
        self.jobs.append(job)
        self.save(job)
        return job

    def save(self, job: JobRecord) -> None:
        atomic_write_text(self.folder / job.name, json.dumps(asdict(job), ensure_ascii=False) + "\n")

    def forget(self, job: JobRecord) -> None:
        self.jobs.remove(job)
        (self.folder / job.name).unlink(missing_ok=True)

    def rows_in_jobs(self) -> set[str]:
        return {call_id for job in self.jobs for call_id in job.call_ids}

    @property
    def rounds(self) -> int:
        return max((job.round for job in self.jobs), default=0)
