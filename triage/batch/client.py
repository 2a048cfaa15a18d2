"""Submitting, watching and collecting batch jobs: lm15's batch operations, from the driver only.

DSPy's vendored lm15 builds every HTTP request (OpenAI: the JSONL file uploaded to `/files`,
then `/batches`, each line aimed at `/v1/responses`; Anthropic: `/messages/batches`) and parses
every answer into canonical `Response`s; `--api-base` becomes lm15's base URL for the provider.
Here are only the choice of provider, retries of transient failures (tenacity), and one-line
errors with the key scrubbed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dspy.lm15 import BatchEntry, BatchJobInfo, BatchRequest, LMRouter, Request, RouterConfig, Timeouts
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from triage.batch.engine import wire_model
from triage.cost import BATCH_PROVIDERS
from triage.errors import ConfigError, TriageError, first_line, redact
from triage.lm import NO_KEY
from triage.local import is_local_model
from triage.settings import Settings

logger = logging.getLogger("triage")

# Labels travel with the job where the provider keeps them (Anthropic's batch body has no metadata).
KEEPS_LABELS = {"openai"}


class SubmitRefused(TriageError):
    """The provider answered the submit with a client error (4xx): no job was created."""


def check_batch_model(settings: Settings) -> None:
    """A one-line ConfigError when the model's provider has no batch API this tool can use."""
    if is_local_model(settings.model) or settings.provider not in BATCH_PROVIDERS:
        raise ConfigError(
            f"--batch: {settings.model} has no provider batch API here; batch mode works with openai/... "
            "and anthropic/... models (drop --batch to run it online)"
        )


def _transient(exc: BaseException) -> bool:
    from dspy.utils.exceptions import is_retryable_lm_error

    return is_retryable_lm_error(exc) or bool(getattr(exc, "retryable", False)) or isinstance(exc, OSError)


class BatchClient:
    """One provider's batch operations for one model, built from the run's settings."""

    def __init__(self, settings: Settings) -> None:
        check_batch_model(settings)
        self.provider = settings.provider  # DSPy's provider prefix is lm15's provider name for both
        self.model = wire_model(settings.model)
        self.settings = settings
        key = settings.api_key.get_secret_value() if settings.api_key else (NO_KEY if settings.api_base else None)
        self._secrets = [key] if key and key != NO_KEY else []
        config = RouterConfig(
            api_keys={self.provider: key} if key else None,
            base_urls={self.provider: settings.api_base} if settings.api_base else None,
            timeouts=Timeouts(read=max(settings.timeout, 120.0), write=max(settings.timeout, 120.0)),
        )
        self.lm = LMRouter(config).lm(f"{self.provider}:{self.model}")

    def _call(self, what: str, operation, *args):  # noqa: ANN001, ANN202 - a thin retry wrapper
        retrying = Retrying(
            retry=retry_if_exception(_transient),
            wait=wait_exponential_jitter(multiplier=0.5, max=30.0),
            stop=stop_after_attempt(self.settings.max_retries + 1),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return operation(*args)
        except TriageError:
            raise
        except Exception as exc:
            text = redact(f"{type(exc).__name__}: {first_line(exc)}", self._secrets)
            raise TriageError(f"batch {what} failed ({self.provider}): {text}") from None
        raise AssertionError("unreachable")

    def submit(self, requests: Sequence[Request], label: str) -> BatchJobInfo:
        batch = BatchRequest(
            model=self.model, requests=tuple(requests), label=label if self.provider in KEEPS_LABELS else None
        )
        # Not retried: a submit that timed out may have created the job; the ledger's label finds it.
        try:
            return self.lm.batch_submit(batch)
        except Exception as exc:
            text = redact(f"{type(exc).__name__}: {first_line(exc)}", self._secrets)
            status = getattr(exc, "status", None)
            refused = isinstance(status, int) and 400 <= status < 500
            raise (SubmitRefused if refused else TriageError)(
                f"batch submit failed ({self.provider}): {text}"
            ) from None

    def status(self, job_id: str) -> BatchJobInfo:
        return self._call("status", self.lm.batch_status, job_id)

    def results(self, job_id: str) -> tuple[BatchEntry, ...]:
        return self._call("results", self.lm.batch_results, job_id)

    def cancel(self, job_id: str) -> BatchJobInfo:
        return self._call("cancel", self.lm.batch_cancel, job_id)

    def find(self, label: str) -> BatchJobInfo | None:
        """The job submitted with `label`, where the provider keeps labels (a submit cut off before its id)."""
        if self.provider not in KEEPS_LABELS:
            return None
        jobs = self._call("list", self.lm.batch_list, 100)
        return next((job for job in jobs if job.label == label), None)
