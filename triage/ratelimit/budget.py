"""The arithmetic of the run's budget: two token buckets (requests, tokens) that hand out reservations.

Pure Python, no clock of its own (every call takes `now`), no Ray, no asyncio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from triage.errors import ConfigError

CHARS_PER_TOKEN = 4


def estimate_tokens(text_chars: int, max_output_tokens: int) -> int:
    """Tokens to book for one request before it is sent: `ceil(text_chars / 4) + max_output_tokens`.

    Four characters per token is the usual rule of thumb for English with BPE tokenizers; the completion
    is booked at its cap. Both err high on purpose: `settle` gives back what the answer did not use, so
    an over-estimate costs a little queueing, while an under-estimate could cost a 429.
    `text_chars` should count the whole prompt (instructions, demos and the transcript), not only the
    transcript.
    """
    return math.ceil(max(0, text_chars) / CHARS_PER_TOKEN) + max(0, max_output_tokens)


@dataclass
class _Bucket:
    rate: float  # configured units per second (rpm / 60 or tpm / 60)
    capacity: float  # the most that can be saved up: the burst
    level: float  # units available now; negative while reservations are booked ahead (a debt)


class TokenBudget:
    """Requests per minute and tokens per minute as two token buckets that take reservations.

    Each limit (`rpm`, `tpm`; either may be None) is a bucket refilled at `rate = limit / 60` units per
    second times the AIMD factor `f` (1.0 unless 429s slowed it down), holding at most
    `capacity = max(1, rate * burst_seconds)` units, and starting full.

    Burst: half a second's worth by default. A provider's own bucket typically holds about a second's
    worth; the other half absorbs network jitter. Requests sent at exact intervals do not arrive at
    exact intervals, and a provider whose bucket is kept right at its edge answers 429 to the one that
    arrives a millisecond early: against `tests/fake_provider` at its own rpm, one second of burst got
    about 1% of requests a 429, half a second none. Below 120 rpm the capacity is one request on both
    sides and there is no burst to spare: there, set the limit a little under the provider's. A
    sliding-window provider sees at most `capacity` requests over its limit in its first window.

    `reserve(requests, tokens, now)` takes the units at once, letting the level go negative (a debt of
    capacity booked ahead), and returns how long the caller must wait before sending:

        level -= n;   wait = max(0, -level / (rate * f))        (for each bucket; the larger wait wins)

    i.e. the moment the bucket has refilled the debt, this reservation included. Callers are therefore
    queued first come, first served, each one `n / (rate * f)` seconds after the previous: at rpm=60
    with burst 1 the waits of reservations made at the same instant are 0, 1, 2, 3 ... seconds. Over
    any interval of T seconds the sends never exceed `capacity + rate * T`. Between calls the level
    refills by `rate * (integral of f over the elapsed time)`, up to `capacity`. A single request
    larger than the token capacity is allowed: it waits until its own excess has refilled.

    `settle(estimated, actual, now)` corrects the token bucket once the real usage is known: it gives
    back `estimated - actual` (or takes more when the answer was longer than booked), capped at
    capacity. Capacity given back goes to the next reservation, which may then be served before
    callers that are already sleeping on later slots; the limit itself still holds.

    `penalize(retry_after, now)` is the answer to a 429 (AIMD):

    * nobody may send before `now + retry_after`: each bucket is drained to `level = min(level,
      -retry_after * rate * f)`, so it is empty until the block lifts and resumes at its rate with no
      burst (the first new request goes `retry_after + 1 / (rate * f)` from now); `blocked_until` is
      also kept, for clients whose reservations were booked before the 429 (they book again) and for a
      budget with no limits at all;
    * multiplicative decrease: `f = max(floor, f * decrease)`, at most once per `decrease_interval`
      seconds, because the requests already in flight when the provider ran dry come back as a burst of
      429s that all report the same overload;
    * additive increase: `f` grows back by `recovery` per second (a fraction of the configured rate)
      until it is 1 again: with the defaults one decrease (x0.8) is undone in 20 s.

    The rate used to compute a wait is the one in force when the reservation is made; while `f`
    recovers the real refill is a little faster, so waits err on the long side.

    Not thread-safe: the caller serializes calls (the Ray actor runs them one at a time,
    `LocalLimiter` holds a lock).
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        burst_seconds: float = 0.5,
        decrease: float = 0.8,
        floor: float = 0.1,
        recovery: float = 0.01,
        decrease_interval: float = 1.0,
        default_retry_after: float = 1.0,
    ) -> None:
        for label, limit in (("--rpm / TRIAGE_RPM", rpm), ("--tpm / TRIAGE_TPM", tpm)):
            if limit is not None and not (math.isfinite(limit) and limit > 0):
                raise ConfigError(f"{label} must be a positive number of units per minute, got {limit}")
        if not (math.isfinite(burst_seconds) and burst_seconds >= 0):
            raise ConfigError(f"burst_seconds must be 0 or more, got {burst_seconds}")
        if not 0 < floor <= decrease <= 1:
            raise ConfigError(f"need 0 < floor <= decrease <= 1, got floor={floor}, decrease={decrease}")
        if recovery < 0 or decrease_interval < 0 or default_retry_after < 0:
            raise ConfigError("recovery, decrease_interval and default_retry_after must be 0 or more")
        self.rpm = rpm
        self.tpm = tpm
        self.burst_seconds = burst_seconds
        self.decrease = decrease
        self.floor = floor
        self.recovery = recovery
        self.decrease_interval = decrease_interval
        self.default_retry_after = default_retry_after
        self._requests = self._bucket(rpm)
        self._tokens = self._bucket(tpm)
        self._factor = 1.0
        self._stamp: float | None = None  # the `now` of the last call; None before the first
        self._blocked_until = -math.inf
        self._last_decrease = -math.inf
        self.penalties = 0  # also a generation number: clients compare it to spot a 429 after their booking
        self._counts = {"reservations": 0, "requests": 0, "tokens": 0, "settled_tokens": 0, "decreases": 0}
        self._waited = {"total": 0.0, "max": 0.0}

    def _bucket(self, per_minute: float | None) -> _Bucket | None:
        if per_minute is None:
            return None
        rate = per_minute / 60.0
        capacity = max(1.0, rate * self.burst_seconds)
        return _Bucket(rate=rate, capacity=capacity, level=capacity)

    def _buckets(self) -> list[_Bucket]:
        return [b for b in (self._requests, self._tokens) if b is not None]

    @property
    def factor(self) -> float:
        """The AIMD factor at the last call: the share of the configured rates in force."""
        return self._factor

    def settings(self) -> dict[str, float | None]:
        """What this budget was built from (to check that a shared actor matches the run's settings)."""
        return {
            "rpm": self.rpm,
            "tpm": self.tpm,
            "burst_seconds": self.burst_seconds,
            "decrease": self.decrease,
            "floor": self.floor,
            "recovery": self.recovery,
            "decrease_interval": self.decrease_interval,
            "default_retry_after": self.default_retry_after,
        }

    def _advance(self, now: float) -> None:
        """Refill the buckets and recover the factor from the last call to `now` (a clock going back: no-op)."""
        if self._stamp is None:
            self._stamp = now
            return
        elapsed = now - self._stamp
        if elapsed <= 0:
            return
        f0 = self._factor
        if f0 >= 1.0 or self.recovery == 0:
            integral, f1 = f0 * elapsed, f0
        else:
            ramp = (1.0 - f0) / self.recovery  # seconds until f is back at 1
            if elapsed >= ramp:
                integral, f1 = f0 * ramp + self.recovery * ramp * ramp / 2 + (elapsed - ramp), 1.0
            else:
                integral, f1 = f0 * elapsed + self.recovery * elapsed * elapsed / 2, f0 + self.recovery * elapsed
        for bucket in self._buckets():
            bucket.level = min(bucket.capacity, bucket.level + bucket.rate * integral)
        self._factor = f1
        self._stamp = now

    def reserve(self, requests: int = 1, tokens: int = 0, *, now: float) -> float:
        """Book `requests` and `tokens` now; the seconds the caller must wait before sending (0: go now)."""
        self._advance(now)
        wait = max(0.0, self._blocked_until - now)
        for bucket, amount in ((self._requests, requests), (self._tokens, tokens)):
            if bucket is None or amount <= 0:
                continue
            bucket.level -= amount
            if bucket.level < 0:
                wait = max(wait, -bucket.level / (bucket.rate * self._factor))
        self._counts["reservations"] += 1
        self._counts["requests"] += requests
        self._counts["tokens"] += tokens
        self._waited["total"] += wait
        self._waited["max"] = max(self._waited["max"], wait)
        return wait

    def settle(self, estimated: int, actual: int, *, now: float) -> None:
        """Correct the token bucket with the tokens a request really used (`estimated` was booked)."""
        self._advance(now)
        self._counts["settled_tokens"] += actual - estimated
        if self._tokens is not None:
            self._tokens.level = min(self._tokens.capacity, self._tokens.level + estimated - actual)

    def penalize(self, retry_after: float | None, *, now: float) -> float:
        """A 429 arrived: block until `now + retry_after`, slow down (AIMD); returns the seconds blocked from now.

        `retry_after` None (no usable header) counts as `default_retry_after`.
        """
        if retry_after is None or not math.isfinite(retry_after):
            retry_after = self.default_retry_after
        retry_after = max(0.0, retry_after)
        self._advance(now)
        if now - self._last_decrease >= self.decrease_interval:
            self._factor = max(self.floor, self._factor * self.decrease)
            self._last_decrease = now
            self._counts["decreases"] += 1
        self._blocked_until = max(self._blocked_until, now + retry_after)
        for bucket in self._buckets():
            bucket.level = min(bucket.level, -retry_after * bucket.rate * self._factor)
        self.penalties += 1
        return self.blocked_for(now)

    def blocked_for(self, now: float) -> float:
        """Seconds from `now` until the last 429's block lifts (0 when not blocked)."""
        return max(0.0, self._blocked_until - now)

    def stats(self, *, now: float) -> dict[str, Any]:
        """Counters and current state, for logs and the benchmark's printout."""
        self._advance(now)
        return {
            **self.settings(),
            "factor": self._factor,
            "effective_rpm": None if self.rpm is None else self.rpm * self._factor,
            "effective_tpm": None if self.tpm is None else self.tpm * self._factor,
            **self._counts,
            "penalties": self.penalties,
            "waited_total": self._waited["total"],
            "waited_max": self._waited["max"],
            "blocked_for": self.blocked_for(now),
            "requests_level": None if self._requests is None else self._requests.level,
            "tokens_level": None if self._tokens is None else self._tokens.level,
        }
