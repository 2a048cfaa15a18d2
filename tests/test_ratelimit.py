"""The run's rate limiter: the budget's arithmetic on a fake clock, the clients, one named actor shared
by two Ray actors, and a rate-limited local server that sees no 429 when the limiter is set at its limit."""

from __future__ import annotations

import asyncio
import json
import math
import pickle
import time
import uuid
from typing import Any

import pytest

from tests.fake_provider import FakeProvider
from triage.errors import ConfigError
from triage.ratelimit import (
    LocalLimiter,
    NoLimit,
    RayLimiter,
    RayLimiterRef,
    TokenBudget,
    estimate_tokens,
    get_or_create_limiter,
    limiter_name,
)


class FakeClock:
    """A clock that moves only when told; its `sleep` records the wait and moves the clock by it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def waits(budget: TokenBudget, count: int, *, now: float = 0.0, tokens: int = 0) -> list[float]:
    return [budget.reserve(1, tokens, now=now) for _ in range(count)]


# ─── TokenBudget ───────────────────────────────────────────────────────────────────────────────────────────


def test_rpm_60_books_one_slot_per_second_after_the_burst():
    assert waits(TokenBudget(rpm=60), 5) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert waits(TokenBudget(rpm=60, burst_seconds=3), 6) == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0]


def test_burst_is_half_a_seconds_worth_by_default():
    assert waits(TokenBudget(rpm=600), 7) == pytest.approx([0.0] * 5 + [0.1, 0.2])
    assert waits(TokenBudget(rpm=600, burst_seconds=1), 12) == pytest.approx([0.0] * 10 + [0.1, 0.2])
    assert waits(TokenBudget(rpm=6), 2) == [0.0, 10.0]  # at least one request, whatever the rate


def test_the_bucket_refills_at_the_rate_and_no_further_than_the_burst():
    budget = TokenBudget(rpm=60)
    assert budget.reserve(now=0.0) == 0.0
    assert budget.reserve(now=0.5) == 0.5  # half a second refilled, half to go
    assert budget.reserve(now=100.0) == 0.0  # idle for long: full again, but only one request's worth
    assert budget.reserve(now=100.0) == 1.0


def test_tpm_limits_by_tokens_and_a_request_larger_than_the_burst_waits_for_its_excess():
    budget = TokenBudget(tpm=6000, burst_seconds=1)  # 100 tokens/s, 100 tokens of burst
    assert waits(budget, 4, tokens=50) == [0.0, 0.0, 0.5, 1.0]
    assert TokenBudget(tpm=6000, burst_seconds=1).reserve(1, 300, now=0.0) == 2.0


def test_with_both_limits_the_longer_wait_wins():
    budget = TokenBudget(rpm=60, tpm=6000, burst_seconds=1)
    assert budget.reserve(1, 10, now=0.0) == 0.0
    assert budget.reserve(1, 10, now=0.0) == 1.0  # requests are the bottleneck
    assert budget.reserve(1, 500, now=0.0) == pytest.approx(4.2)  # tokens are: 100 - 520 = -420 at 100/s


def test_settle_gives_back_unused_tokens_and_takes_overruns():
    budget = TokenBudget(tpm=6000, burst_seconds=1)
    assert budget.reserve(1, 300, now=0.0) == 2.0  # level -200
    budget.settle(300, 100, now=0.0)  # only 100 used: level 0
    assert budget.reserve(1, 50, now=0.0) == 0.5
    budget.settle(50, 250, now=0.0)  # 200 more than booked: level -250
    assert budget.reserve(1, 0, now=0.0) == 0.0  # a request with no token estimate does not wait for tokens
    assert budget.reserve(1, 50, now=0.0) == 3.0
    assert budget.stats(now=0.0)["settled_tokens"] == 0


def test_settle_never_saves_more_than_the_burst_and_is_harmless_without_tpm():
    budget = TokenBudget(tpm=6000, burst_seconds=1)
    budget.settle(1000, 0, now=0.0)
    assert budget.reserve(1, 150, now=0.0) == 0.5
    no_tpm = TokenBudget(rpm=60)
    no_tpm.settle(100, 10, now=0.0)
    assert waits(no_tpm, 2) == [0.0, 1.0]


def test_penalize_blocks_until_retry_after_and_slows_down():
    budget = TokenBudget(rpm=60, recovery=0)
    assert budget.reserve(now=0.0) == 0.0
    assert budget.penalize(5.0, now=0.0) == 5.0
    assert budget.factor == 0.8
    # Empty until t=5, then one request per 1/(1 * 0.8) = 1.25 s.
    assert waits(budget, 3) == [6.25, 7.5, 8.75]


def test_after_a_429_nobody_sends_before_retry_after_even_with_burst_left():
    budget = TokenBudget(rpm=6000)  # 100/s, 100 saved up
    budget.penalize(2.0, now=0.0)
    assert min(waits(budget, 50)) >= 2.0
    unlimited = TokenBudget()  # no limits: only the block
    unlimited.penalize(2.0, now=10.0)
    assert [unlimited.reserve(now=10.0), unlimited.reserve(now=11.5), unlimited.reserve(now=12.0)] == [2.0, 0.5, 0.0]


def test_penalize_without_retry_after_uses_the_default():
    budget = TokenBudget(default_retry_after=3.0)
    assert budget.penalize(None, now=0.0) == 3.0
    assert budget.penalize(math.nan, now=0.0) == 3.0


def test_one_decrease_per_interval_down_to_the_floor():
    budget = TokenBudget(rpm=600, recovery=0, decrease=0.5, floor=0.2)
    for _ in range(5):  # a burst of 429s from the same overload
        budget.penalize(0.1, now=0.0)
    assert budget.factor == 0.5
    budget.penalize(0.1, now=0.5)
    assert budget.factor == 0.5
    budget.penalize(0.1, now=1.0)
    assert budget.factor == 0.25
    budget.penalize(0.1, now=2.0)
    assert budget.factor == 0.2  # the floor
    stats = budget.stats(now=2.0)
    assert (stats["penalties"], stats["decreases"], stats["effective_rpm"]) == (8, 3, 120.0)


def test_the_rate_recovers_additively_and_the_refill_follows_it():
    budget = TokenBudget(rpm=60, recovery=0.01)
    budget.penalize(5.0, now=0.0)  # f = 0.8, level = -5 * 1 * 0.8 = -4
    stats = budget.stats(now=2.0)
    assert stats["factor"] == pytest.approx(0.82)
    assert stats["requests_level"] == pytest.approx(-4 + 0.8 * 2 + 0.01 * 2 * 2 / 2)
    assert budget.stats(now=10.0)["factor"] == pytest.approx(0.9)
    assert budget.stats(now=20.0)["factor"] == 1.0
    assert budget.stats(now=1000.0)["factor"] == 1.0
    assert budget.stats(now=1000.0)["requests_level"] == 1.0


def test_invalid_limits_say_which_setting_to_fix():
    with pytest.raises(ConfigError, match="--rpm / TRIAGE_RPM"):
        TokenBudget(rpm=0)
    with pytest.raises(ConfigError, match="--tpm / TRIAGE_TPM"):
        TokenBudget(tpm=-5)
    with pytest.raises(ConfigError, match="floor"):
        TokenBudget(rpm=60, decrease=0.5, floor=0.6)


def test_estimate_tokens_is_a_quarter_of_the_characters_plus_the_completion():
    assert estimate_tokens(400, 100) == 200
    assert estimate_tokens(401, 0) == 101
    assert estimate_tokens(-3, -1) == 0


# ─── LocalLimiter ──────────────────────────────────────────────────────────────────────────────────────────


def test_concurrent_callers_are_served_in_turn_one_slot_each():
    clock = FakeClock()
    booked: list[float] = []

    async def record(seconds: float) -> None:  # the clock stands still: every caller books at t=0
        booked.append(seconds)
        await asyncio.sleep(0)

    limiter = LocalLimiter(TokenBudget(rpm=600), clock=clock, sleep=record)

    async def main() -> None:
        await asyncio.gather(*(limiter.acquire() for _ in range(100)))

    asyncio.run(main())
    # 5 go at once (the burst); the other 95 sleep, in the order they came, 0.1 s apart.
    assert booked == pytest.approx([0.1 * i for i in range(1, 96)])
    assert len(set(booked)) == 95


def test_local_limiter_settles_and_penalizes_the_budget():
    clock = FakeClock()
    budget = TokenBudget(rpm=60, tpm=6000, burst_seconds=1, recovery=0)
    limiter = LocalLimiter(budget, clock=clock, sleep=clock.sleep)

    async def main() -> None:
        await limiter.acquire(300)  # tokens: 100 - 300 = -200 -> 2 s
        await limiter.settle(300, 100)
        await limiter.penalize(1.0)

    asyncio.run(main())
    assert clock.sleeps == [2.0] and clock.now == 2.0
    stats = limiter.stats()
    assert (stats["reservations"], stats["settled_tokens"], stats["penalties"], stats["factor"]) == (1, -200, 1, 0.8)


def test_a_caller_whose_slot_falls_inside_a_later_block_books_again():
    clock = FakeClock()
    limiter = LocalLimiter(TokenBudget(rpm=60, recovery=0), clock=clock)

    async def sleep(seconds: float) -> None:
        clock.sleeps.append(seconds)
        if len(clock.sleeps) == 1:  # while the second caller sleeps toward t=1, a 429 arrives at t=0.5
            clock.now = 0.5
            await limiter.penalize(5.0)
            clock.now = 1.0
        else:
            clock.now += seconds

    limiter._sleep = sleep

    async def main() -> None:
        await limiter.acquire()
        await limiter.acquire()

    asyncio.run(main())
    # At t=1 the block (until 5.5) is news: book again. Level then: min(-0.5, -4) + 0.5 * 0.8 - 1 = -4.6,
    # at 0.8 per second: 5.75 s, so it goes at 6.75 = 0.5 + 5 + 1.25.
    assert clock.sleeps == pytest.approx([1.0, 5.75])
    assert clock.now == pytest.approx(6.75)


def test_no_limit_never_waits():
    async def main() -> None:
        limiter = NoLimit()
        for _ in range(3):
            await limiter.acquire(10**6)
        await limiter.settle(1, 2)
        await limiter.penalize(30.0)

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 0.5


# ─── RayLimiter's client logic, with the actor replaced by a local stand-in ─────────────────────────────────


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.fn(*args))
        return future


class StandInActor:
    """`_BudgetActor`'s methods as awaitables, on a fake clock; records what each reserve carried."""

    def __init__(self, budget: TokenBudget, clock: FakeClock) -> None:
        self.budget, self.clock, self.calls = budget, clock, []
        self.reserve = _Method(self._reserve)
        self.penalize = _Method(self._penalize)

    def _reserve(
        self, tokens: list[int], estimated: int, actual: int, usd: float = 0.0, refusable: bool = True
    ) -> tuple[list[float], float, int]:
        self.calls.append((tokens, estimated, actual))
        now = self.clock()
        if estimated or actual:
            self.budget.settle(estimated, actual, now=now)
        waits = [self.budget.reserve(1, t, now=now) for t in tokens]
        return waits, self.budget.blocked_for(now), self.budget.penalties

    def _penalize(self, retry_after: float | None) -> tuple[float, int]:
        return self.budget.penalize(retry_after, now=self.clock()), self.budget.penalties


def test_ray_limiter_sends_token_corrections_with_the_next_reservation():
    clock = FakeClock()
    actor = StandInActor(TokenBudget(tpm=6000, burst_seconds=1), clock)
    limiter = RayLimiter(actor, clock=clock, sleep=clock.sleep)

    async def main() -> None:
        await limiter.acquire(300)
        await limiter.settle(300, 100)
        await limiter.settle(50, 40)
        await limiter.acquire(50)

    asyncio.run(main())
    assert actor.calls == [([300], 0, 0), ([50], 350, 140)]
    # -200 at t=0, refilled to 0 by t=2, then +210 (capped at 100) - 50: no wait.
    assert clock.sleeps == [2.0]
    assert limiter.stats()["round_trips"] == 2


def test_ray_limiter_books_again_when_another_actors_429_blocks_its_slot():
    clock = FakeClock()
    actor = StandInActor(TokenBudget(rpm=60, recovery=0), clock)
    mine = RayLimiter(actor, clock=clock)  # one Stage actor: callers A and B
    other = RayLimiter(actor, clock=clock)  # another Stage actor, elsewhere

    async def sleep(seconds: float) -> None:
        clock.sleeps.append(seconds)
        if len(clock.sleeps) == 1:  # while A sleeps toward its slot at t=1:
            clock.now = 0.5
            await other.penalize(5.0)  # the other actor gets a 429 (blocked until 5.5) ...
            clock.now = 0.6
            await mine.acquire()  # ... and B's reply tells this actor about it (B's sleep returns at once)
            clock.now = 1.0

    mine._sleep = sleep

    async def main() -> None:
        await mine.acquire()  # burst
        await mine.acquire()  # A: slot at t=1, which the block voids

    asyncio.run(main())
    # B at 0.6: level min(-0.5, -4) + 0.1 * 0.8 - 1 = -4.92 -> 6.15 s; A again at 1.0: -4.92 + 0.32 - 1 -> 7 s.
    assert clock.sleeps == pytest.approx([1.0, 6.15, 7.0])
    assert len(actor.calls) == 4  # burst, A, B, A again


def test_ray_limiter_books_callers_that_arrive_together_in_one_call():
    clock = FakeClock()
    actor = StandInActor(TokenBudget(rpm=600), clock)
    booked: list[float] = []

    async def record(seconds: float) -> None:
        booked.append(seconds)

    limiter = RayLimiter(actor, clock=clock, sleep=record)

    async def main() -> None:
        await asyncio.gather(*(limiter.acquire(i) for i in range(20)))
        await limiter.acquire(99)

    asyncio.run(main())
    assert actor.calls == [(list(range(20)), 0, 0), ([99], 0, 0)]
    assert booked == pytest.approx([0.1 * i for i in range(1, 17)])  # in arrival order, after a burst of 5
    assert limiter.stats()["round_trips"] == 2 and limiter.stats()["reservations"] == 21


def test_ray_limiter_hands_an_actor_failure_to_every_waiting_caller():
    class Broken:
        class reserve:  # noqa: N801 - mimics a Ray actor method
            @staticmethod
            def remote(*args: Any) -> Any:
                async def fail() -> None:
                    raise RuntimeError("limiter actor died")

                return fail()

    limiter = RayLimiter(Broken())

    async def main() -> list[Any]:
        return await asyncio.gather(*(limiter.acquire() for _ in range(3)), return_exceptions=True)

    assert [str(e) for e in asyncio.run(main())] == ["limiter actor died"] * 3


def test_a_limiter_ref_travels_without_the_drivers_handle():
    ref = RayLimiterRef("triage-rate-limiter-x", "ns", actor=object())
    copy = pickle.loads(pickle.dumps(ref))
    assert copy == ref and copy.actor is None  # actors look the limiter up by name


# ─── One budget in a named Ray actor, shared by two Ray actors ──────────────────────────────────────────────


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


class _Client:
    """A Ray actor standing in for a Stage actor: books `count` requests at once and reports the slots."""

    def __init__(self, ref: RayLimiterRef) -> None:
        self.slots: list[float] = []
        self.limiter = ref.connect(sleep=self._book)

    async def _book(self, seconds: float) -> None:  # records the slot instead of sleeping to it
        self.slots.append(time.monotonic() + seconds)

    async def run(self, count: int) -> dict[str, Any]:
        started = time.monotonic()
        await asyncio.gather(*(self.limiter.acquire() for _ in range(count)))
        return {"slots": [started] * (count - len(self.slots)) + self.slots, "stats": self.limiter.stats()}

    async def round_trips(self, count: int) -> float:
        started = time.monotonic()
        for _ in range(count):
            await self.limiter.acquire()
        return (time.monotonic() - started) / count


@pytest.mark.slow
def test_two_actors_sharing_one_named_limiter_stay_within_the_budget(ray_local):
    ray = ray_local
    run_id = uuid.uuid4().hex[:8]
    ref = get_or_create_limiter(run_id, rpm=600, tpm=None, burst_seconds=1.0)  # 10/s, 10 of burst
    assert ref == RayLimiterRef(limiter_name(run_id), ray.get_runtime_context().namespace)
    assert get_or_create_limiter(run_id, rpm=600, tpm=None, burst_seconds=1.0) == ref  # found, not created again
    with pytest.raises(ConfigError, match="other settings"):
        get_or_create_limiter(run_id, rpm=1200, tpm=None, burst_seconds=1.0)

    client = ray.remote(num_cpus=0)(_Client)
    first, second = client.remote(ref), client.remote(ref)
    ray.get([first.__ray_ready__.remote(), second.__ray_ready__.remote()])  # both up: they book at the same time
    results = ray.get([first.run.remote(30), second.run.remote(30)])
    slots = sorted(s for r in results for s in r["slots"])
    assert len(slots) == 60
    # Never more than the burst plus the rate in any window: slots i..j span at least (j - i + 1 - 10) / 10 s
    # (less a few ms: a slot is measured when the reply arrives, after the actor booked it).
    for i in range(60):
        for j in range(i + 10, 60):
            assert slots[j] - slots[i] >= (j - i + 1 - 10) / 10 - 0.05
    assert slots[-1] - slots[0] >= 5.0 - 0.05
    stats = ray.get(ray.get_actor(ref.name, namespace=ref.namespace).stats.remote())
    assert (stats["reservations"], stats["requests"]) == (60, 60)
    assert sum(r["stats"]["round_trips"] for r in results) < 60  # callers that came together were booked together

    mean = ray.get(first.round_trips.remote(200))  # one after the other; the waits are recorded, not slept
    print(f"RayLimiter.acquire round trip: {mean * 1000:.2f} ms")
    assert mean < 0.05


# ─── Against a rate-limited server ──────────────────────────────────────────────────────────────────────────


async def post_chat(port: int, text: str) -> tuple[int, float | None, int]:
    """One chat request over a fresh connection: (status, Retry-After, total tokens)."""
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": text}]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    header_block, _, payload = raw.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    retry_after = float(headers["retry-after"]) if "retry-after" in headers else None
    usage = json.loads(payload).get("usage") or {}
    return int(lines[0].split()[1]), retry_after, int(usage.get("total_tokens") or 0)


async def drive(port: int, limiter: LocalLimiter, count: int, workers: int) -> int:
    """Send `count` requests from `workers` concurrent loops, each gated by the limiter; returns the 429s."""
    queue = list(range(count))
    too_many = 0

    async def worker() -> None:
        nonlocal too_many
        while queue:
            i = queue.pop()
            while True:
                estimate = estimate_tokens(40, 50)
                await limiter.acquire(estimate)
                status, retry_after, tokens = await post_chat(port, f"caller {i} reports a fire")
                if status != 429:
                    assert status == 200
                    await limiter.settle(estimate, tokens)
                    break
                too_many += 1
                await limiter.penalize(retry_after)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return too_many


@pytest.mark.parametrize(("server_rpm", "limiter_rpm"), [(1800, 1800)])
def test_a_limiter_at_the_servers_rpm_sees_no_429(server_rpm, limiter_rpm):
    with FakeProvider(rpm=server_rpm) as provider:
        limiter = LocalLimiter(TokenBudget(rpm=limiter_rpm))
        started = time.monotonic()
        too_many = asyncio.run(drive(provider.port, limiter, 90, workers=16))
        elapsed = time.monotonic() - started
        stats = provider.stats()
    assert too_many == 0 and stats["outcomes"]["429"] == 0
    assert stats["outcomes"]["ok"] == 90
    assert elapsed >= (90 - 15) / 30 - 0.05  # 15 at once, then 30/s: the limiter did hold them back


def test_a_limiter_above_the_servers_rpm_backs_off_and_loses_nothing():
    with FakeProvider(rpm=1800) as provider:
        limiter = LocalLimiter(TokenBudget(rpm=3600))
        too_many = asyncio.run(drive(provider.port, limiter, 120, workers=16))
        stats = provider.stats()
    assert stats["outcomes"]["ok"] == 120
    assert too_many == stats["outcomes"]["429"] > 0
    budget = limiter.stats()
    assert budget["decreases"] >= 1 and budget["factor"] < 1.0
    assert too_many < 60, f"AIMD should keep 429s well below the requests sent ({too_many})"
