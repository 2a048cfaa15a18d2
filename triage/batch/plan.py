"""Job planning: rendered requests into jobs that stay under the provider's limits.

A row's requests always travel in the same job (the row is collected when its job is), so a job
closes before the row that would take it over the limit on requests or bytes. Bytes are counted
on the canonical request JSON with headroom for the provider's own wrapping of each line
(`BYTES_HEADROOM`, `LINE_OVERHEAD`): the wire body measured 2% larger than the canonical JSON for
the committed programs (OpenAI Responses 3,652 against 3,590 bytes), plus the line's `custom_id`,
`method` and `url`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from triage.settings import Settings

# Requests and bytes one job may hold: OpenAI Batch API (50,000 requests, a 200 MB input file),
# Anthropic Message Batches (100,000 requests, 256 MB).
PROVIDER_LIMITS = {"openai": (50_000, 200_000_000), "anthropic": (100_000, 256_000_000)}
BYTES_HEADROOM = 1.1
LINE_OVERHEAD = 256


@dataclass(frozen=True)
class JobLimits:
    requests: int
    bytes: int

    @classmethod
    def for_settings(cls, settings: Settings) -> JobLimits:
        requests, size = PROVIDER_LIMITS[settings.provider]
        return cls(settings.batch_max_requests or requests, settings.batch_max_bytes or size)


def request_bytes(request_json: str) -> int:
    """What one request is counted as against the job's byte limit."""
    return int(len(request_json.encode("utf-8")) * BYTES_HEADROOM) + LINE_OVERHEAD


@dataclass(frozen=True)
class PlannedRequest:
    call_id: str
    stage: str
    request: str  # lm15 request JSON
    sha: str
    feedback: str | None = None


@dataclass
class JobPlan:
    """The requests of one job, in order: a request's index is its `custom_id` at the provider."""

    requests: list[PlannedRequest] = field(default_factory=list)
    bytes: int = 0

    @property
    def call_ids(self) -> list[str]:
        return list(dict.fromkeys(r.call_id for r in self.requests))


class Planner:
    """Takes each row's requests as they are rendered, hands out full jobs (and the last one at `finish`)."""

    def __init__(self, limits: JobLimits) -> None:
        self.limits = limits
        self.too_large: list[str] = []
        self._job = JobPlan()

    def add_row(self, requests: list[PlannedRequest]) -> Iterator[JobPlan]:
        """Add one row's requests; yields the job they did not fit in, if they closed one."""
        size = sum(request_bytes(r.request) for r in requests)
        if len(requests) > self.limits.requests or size > self.limits.bytes:
            self.too_large.append(requests[0].call_id)  # in no job: answered online when collected
            return
        job = self._job
        if job.requests and (
            len(job.requests) + len(requests) > self.limits.requests or job.bytes + size > self.limits.bytes
        ):
            yield job
            self._job = job = JobPlan()
        job.requests.extend(requests)
        job.bytes += size

    def finish(self) -> Iterator[JobPlan]:
        if self._job.requests:
            yield self._job
        self._job = JobPlan()
