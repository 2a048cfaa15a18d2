"""One budget of requests and tokens per minute for the whole run: every actor, both stages, every node.

Three layers, from the inside out, one module each:

* `budget.py`: `TokenBudget` is the arithmetic: two token buckets (requests, tokens) that hand out
  reservations. Pure Python, no clock of its own (every call takes `now`), no Ray, no asyncio.
* `actor.py`: `_BudgetActor` holds the run's one `TokenBudget` in a named Ray actor that the driver
  creates with `get_or_create_limiter` and every Stage actor finds by name (`RayLimiterRef.connect`).
* `limiter.py`: `RateLimiter` is the seam a Stage calls around each LM request: `acquire` before
  sending, `settle` with the real token usage after an answer, `penalize` when a 429 arrives anyway.
  `NoLimit` does nothing, `LocalLimiter` keeps a `TokenBudget` in-process (evaluate, optimize, tests),
  `RayLimiter` (in `actor.py`) asks the named actor (at most one call in flight per Stage actor,
  booking every request that queued meanwhile; token corrections ride along).

The wait is always computed, never polled: a caller books its slot and sleeps exactly until it.
"""

from triage.ratelimit.actor import LIMITER_NAME_PREFIX, RayLimiter, RayLimiterRef, get_or_create_limiter, limiter_name
from triage.ratelimit.budget import CHARS_PER_TOKEN, TokenBudget, estimate_tokens
from triage.ratelimit.limiter import Clock, CostCeilingReached, LocalLimiter, NoLimit, RateLimiter, Sleep

__all__ = [
    "CHARS_PER_TOKEN",
    "LIMITER_NAME_PREFIX",
    "Clock",
    "CostCeilingReached",
    "LocalLimiter",
    "NoLimit",
    "RateLimiter",
    "RayLimiter",
    "RayLimiterRef",
    "Sleep",
    "TokenBudget",
    "estimate_tokens",
    "get_or_create_limiter",
    "limiter_name",
]
