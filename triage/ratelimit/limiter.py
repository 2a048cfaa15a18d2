"""The seam a Stage calls around each LM request (`RateLimiter`), and the in-process limiters.

`NoLimit` does nothing; `LocalLimiter` keeps a `TokenBudget` in this process (evaluate, optimize, tests).
The run-wide limiter shared by every Ray actor is `RayLimiter`, in `actor.py`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from triage.ratelimit.budget import TokenBudget

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class CostCeilingReached(Exception):
    """The run's spend reached its ceiling (--max-cost): no new request may be sent."""


class RateLimiter(ABC):
    """Around each LM request: `acquire` before sending, `settle` after an answer, `penalize` on a 429.

    `acquire` returns when the request may be sent (or raises `CostCeilingReached` when a ceiling on
    the run's spend is set and reached). `settle`, `spend` and `penalize` are optional refinements
    (no-ops here). Methods are called from one event loop.
    """

    @abstractmethod
    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request of about `tokens` tokens (prompt + completion) may be sent."""

    async def settle(self, estimated: int, actual: int) -> None:  # noqa: B027 - optional hook, no-op by default
        """The request booked with `estimated` tokens used `actual` (prompt + completion)."""

    async def penalize(self, retry_after: float | None) -> None:  # noqa: B027 - optional hook, no-op by default
        """The provider answered 429; `retry_after` is its Retry-After in seconds, if any."""

    async def spend(self, usd: float) -> None:  # noqa: B027 - optional hook, no-op by default
        """A request's answer cost `usd` (counted against the run's ceiling, where there is one)."""

    def stats(self) -> dict[str, Any]:
        """What the limiter knows locally (the shared counters live in the budget)."""
        return {}


class NoLimit(RateLimiter):
    """No budget: every request goes at once (the stage's semaphore still bounds what is in flight)."""

    async def acquire(self, tokens: int = 0) -> None:
        return None


class LocalLimiter(RateLimiter):
    """A `TokenBudget` in this process, shared by every coroutine (and thread) that holds this limiter.

    A caller whose booked slot falls inside a block that a later 429 imposed books again instead of
    sending into it (at most once per 429 that arrives while it sleeps; never a polling loop).
    """

    def __init__(self, budget: TokenBudget, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.budget = budget
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()

    async def acquire(self, tokens: int = 0) -> None:
        while True:
            with self._lock:
                wait = self.budget.reserve(1, tokens, now=self._clock())
                generation = self.budget.penalties
            if wait > 0:
                await self._sleep(wait)
            with self._lock:
                if self.budget.penalties == generation or self.budget.blocked_for(self._clock()) <= 0:
                    return

    async def settle(self, estimated: int, actual: int) -> None:
        with self._lock:
            self.budget.settle(estimated, actual, now=self._clock())

    async def penalize(self, retry_after: float | None) -> None:
        with self._lock:
            self.budget.penalize(retry_after, now=self._clock())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self.budget.stats(now=self._clock())
