"""The run's one budget in a named Ray actor (`_BudgetActor`), and the client each Stage actor holds.

The driver creates the actor with `get_or_create_limiter`; every Stage actor finds it by name
(`RayLimiterRef.connect`) and books through a `RayLimiter`: at most one call in flight per Stage
actor, booking every request that queued meanwhile; token corrections and the spend ride along.

The same actor keeps the run's spend (USD, counted from the answers' tokens) when a ceiling is set
(`--max-cost`): once it is reached, a booking's wait is infinite and the client raises
`CostCeilingReached` instead of sending (and, knowing it, refuses every later request at once).
A client made with `refusable=False` (the stages after the first, which finish rows already paid
for) is never refused. Requests already in flight still finish, so the spend passes the ceiling
by their cost and that of finishing the rows already started.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

from triage.errors import ConfigError
from triage.ratelimit.budget import TokenBudget
from triage.ratelimit.limiter import Clock, CostCeilingReached, RateLimiter, Sleep

LIMITER_NAME_PREFIX = "triage-rate-limiter-"


class RayLimiter(RateLimiter):
    """The run's budget in the named actor: book there, sleep here.

    At most one `reserve` call per Stage actor is in flight: callers that arrive while it is out wait
    for the next one, which books all of them at once (in arrival order). At light load that is one
    round trip per request; under heavy load the calls stay few while the batches grow, so the one actor
    keeps up with many nodes. Token corrections from `settle` are summed here and travel with the next
    `reserve`. Every reply also says how long the budget is blocked and how many 429s it has seen; a
    caller that wakes inside a block it did not know of when it booked (another actor's 429) books again.
    Use from one event loop.
    """

    def __init__(
        self, actor: Any, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep, refusable: bool = True
    ) -> None:
        self._actor = actor
        self.refusable = refusable
        self._clock = clock
        self._sleep = sleep
        self._queue: list[tuple[int, asyncio.Future[tuple[float, int]]]] = []
        self._pump: asyncio.Task[None] | None = None
        self._unsettled = [0, 0]  # estimated, actual: not yet reported to the actor
        self._unspent = 0.0  # USD not yet reported to the actor
        self._ceiling_reached = False
        self._blocked_until = -math.inf  # in this process's clock
        self._generation = 0
        self.round_trips = 0
        self.round_trip_seconds = 0.0
        self.reservations = 0

    def _observe(self, blocked_for: float, generation: int) -> None:
        if blocked_for > 0:
            self._blocked_until = max(self._blocked_until, self._clock() + blocked_for)
        self._generation = max(self._generation, generation)

    async def acquire(self, tokens: int = 0) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._ceiling_reached:
                raise CostCeilingReached("the run's spend reached --max-cost")
            booked: asyncio.Future[tuple[float, int]] = loop.create_future()
            self._queue.append((tokens, booked))
            if self._pump is None or self._pump.done() or self._pump.get_loop() is not loop:
                self._pump = loop.create_task(self._send_queued())
            wait, generation = await booked
            if math.isinf(wait):
                self._ceiling_reached = True
                continue
            if wait > 0:
                await self._sleep(wait)
            if self._generation == generation or self._clock() >= self._blocked_until:
                return

    async def _send_queued(self) -> None:
        """Book everything queued in one actor call, and again for what queued meanwhile, until none is left."""
        while self._queue:
            batch, self._queue = self._queue, []
            estimated, actual = self._unsettled
            usd, self._unsettled, self._unspent = self._unspent, [0, 0], 0.0
            tokens = [t for t, _ in batch]
            started = self._clock()
            try:
                waits, blocked_for, generation = await self._actor.reserve.remote(
                    tokens, estimated, actual, usd, self.refusable
                )
            except Exception as exc:  # the actor is gone or failed: not swallowed, each waiting caller raises it
                for _, booked in batch:
                    if not booked.done():
                        booked.set_exception(exc)
                continue
            except asyncio.CancelledError:  # the loop is shutting down: nobody may wait forever on this task
                for _, booked in batch + self._queue:
                    booked.cancel()
                self._queue = []
                raise
            self.round_trips += 1
            self.round_trip_seconds += self._clock() - started
            self.reservations += len(batch)
            self._observe(blocked_for, generation)
            for (_, booked), wait in zip(batch, waits, strict=True):
                if not booked.done():  # a cancelled caller leaves its slot unused
                    booked.set_result((wait, generation))

    async def settle(self, estimated: int, actual: int) -> None:
        self._unsettled[0] += estimated
        self._unsettled[1] += actual

    async def spend(self, usd: float) -> None:
        self._unspent += usd

    async def penalize(self, retry_after: float | None) -> None:
        blocked_for, generation = await self._actor.penalize.remote(retry_after)
        self._observe(blocked_for, generation)

    def stats(self) -> dict[str, Any]:
        trips = self.round_trips
        return {
            "round_trips": trips,
            "reservations": self.reservations,
            "mean_round_trip_seconds": self.round_trip_seconds / trips if trips else None,
        }


class _BudgetActor:
    """The run's one `TokenBudget` and spend. A plain (threaded, max_concurrency=1) actor: calls run one at a time."""

    def __init__(
        self, rpm: float | None, tpm: float | None, options: dict[str, float], max_cost: float | None = None
    ) -> None:
        self.budget = TokenBudget(rpm, tpm, **options)
        self.max_cost = max_cost
        self.spent = 0.0
        self.refused = 0

    def reserve(
        self, tokens: list[int], estimated: int = 0, actual: int = 0, usd: float = 0.0, refusable: bool = True
    ) -> tuple[list[float], float, int]:
        """Apply the caller's token corrections and spend, then book one request per entry of `tokens`, in order.

        Returns (the wait of each, seconds the budget is blocked for, 429s seen so far). Once the spend
        has reached `max_cost`, a `refusable` caller's requests are not booked and every wait is infinite.
        """
        now = time.monotonic()
        if estimated or actual:
            self.budget.settle(estimated, actual, now=now)
        self.spent += usd
        if refusable and self.max_cost is not None and self.spent >= self.max_cost:
            self.refused += len(tokens)
            return [math.inf] * len(tokens), self.budget.blocked_for(now), self.budget.penalties
        waits = [self.budget.reserve(1, t, now=now) for t in tokens]
        return waits, self.budget.blocked_for(now), self.budget.penalties

    def penalize(self, retry_after: float | None) -> tuple[float, int]:
        blocked_for = self.budget.penalize(retry_after, now=time.monotonic())
        return blocked_for, self.budget.penalties

    def settings(self) -> dict[str, float | None]:
        return {**self.budget.settings(), "max_cost": self.max_cost}

    def stats(self) -> dict[str, Any]:
        return {
            **self.budget.stats(now=time.monotonic()),
            "max_cost": self.max_cost,
            "spent_usd": self.spent,
            "refused": self.refused,
        }


@dataclass(frozen=True)
class RayLimiterRef:
    """How a Stage actor finds the run's limiter: small and picklable (goes in the stage's config).

    On the driver it also holds the actor's handle (`get_or_create_limiter` fills it in): Ray removes a
    non-detached actor, named or not, once its creator drops the last handle, so the driver keeps this
    object for the whole run. The handle is not pickled: actors find the limiter by name.
    """

    name: str
    namespace: str | None
    actor: Any = field(default=None, compare=False, repr=False)

    def __reduce__(self) -> tuple[Any, tuple[str, str | None]]:
        return RayLimiterRef, (self.name, self.namespace)

    def handle(self) -> Any:
        if self.actor is not None:
            return self.actor
        import ray

        return ray.get_actor(self.name, namespace=self.namespace)

    def connect(
        self, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep, refusable: bool = True
    ) -> RayLimiter:
        """A client of the named actor; call once per Stage actor (in `__init__`).

        `refusable=False`: never refused at the cost ceiling (for a stage that finishes rows already started).
        """
        return RayLimiter(self.handle(), clock=clock, sleep=sleep, refusable=refusable)


def limiter_name(run_id: str) -> str:
    return f"{LIMITER_NAME_PREFIX}{run_id}"


def get_or_create_limiter(
    run_id: str, rpm: float | None, tpm: float | None, *, max_cost: float | None = None, **options: float
) -> RayLimiterRef:
    """On the driver: the run's limiter actor, created on first call, found by name afterwards.

    The actor takes no CPU (so it never holds back a pool on a small machine). It is not detached: it
    ends with the job, or earlier, when the driver lets go of the returned ref (which holds its handle),
    so keep the ref until the run is over. `max_cost`: the run's ceiling on spend in USD (None: no
    ceiling). `options` are TokenBudget's keyword arguments. Raises
    ConfigError for invalid limits, or when an actor of that name already exists with other settings.
    """
    import ray

    budget = TokenBudget(rpm, tpm, **options)  # validates in the driver, before any actor exists
    name = limiter_name(run_id)
    namespace = ray.get_runtime_context().namespace
    actor = (
        ray.remote(_BudgetActor)
        .options(
            name=name,
            namespace=namespace,
            get_if_exists=True,
            lifetime="non_detached",
            num_cpus=0,
            max_restarts=3,
            max_task_retries=3,
        )
        .remote(rpm, tpm, options, max_cost)
    )
    existing = ray.get(actor.settings.remote())
    if existing != {**budget.settings(), "max_cost": max_cost}:
        raise ConfigError(f"rate limiter {name!r} already exists with other settings: {existing}")
    return RayLimiterRef(name=name, namespace=namespace, actor=actor)
