"""DSPy's native HTTP client for a hosted model, with its routing decided once per LM.

For every async call to a model given by name, DSPy 3.4 decides afresh how to reach it:
it selects a backend, re-resolves the route and builds the request once to plan it and
again to send it, and hands three steps to worker threads (prepare, capability lookup,
routing). All of that is a pure function of the LM's settings. Measured with
`scripts/bench_stage_cpu.py` (TriageStage, one process, 32 requests in flight, the
simulated provider): 4.95 ms of CPU per call through plain `dspy.LM("openai/...")`,
3.94 ms through this engine. At 300 calls/s that is a third of a core.

`build_native_lm` takes DSPy's own decision once (`select_backend`, the function DSPy
calls per call) and, when it picks the native route, passes DSPy an async engine that
holds lm15's provider client for that route (`AsyncLMRouter.lm`, lm15's documented way to
keep a provider client). Requests, responses, errors, retries, usage and the cache stay
DSPy's: the engine is the seam `dspy.LM(engine=..., async_engine=...)` offers for this.
Whatever DSPy would not send natively (a model lm15 cannot route, a provider declared with
`dspy.lm15.register_provider`, a gateway set through `<PREFIX>_API_BASE`) gets the plain
`dspy.LM`, as does any other DSPy version than the one this was measured with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from typing import Any

import dspy

logger = logging.getLogger("triage")


class RoutedAsyncEngine:
    """An async DSPy engine that sends every request down one route resolved in advance.

    lm15's async clients own connection pools bound to the event loop that made them,
    so there is one client per running loop (Ray Data calls a stage from one loop).
    """

    def __init__(self, config: Any, provider: str, model: str) -> None:
        self.config = config
        self.provider = provider
        self.model = model
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def _client(self) -> Any:
        from dspy.lm15 import AsyncLMRouter

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = AsyncLMRouter(self.config).lm(f"{self.provider}:{self.model}")
            self._clients[loop] = client
        return client

    async def complete(self, request: Any) -> Any:
        return await self._client().complete(dataclasses.replace(request, model=self.model))


def build_native_lm(model: str, *, cache: bool, num_retries: int, client_kwargs: dict[str, Any]) -> dspy.BaseLM:
    """`dspy.LM(model, ...)`, or the same LM with its native route resolved once (see the module docstring)."""
    plain = dspy.LM(model, cache=cache, num_retries=num_retries, **client_kwargs)
    try:
        from dspy.clients.backend_selection import select_backend
        from dspy.clients.engines.lm15_engine import LM15Engine, timeouts_for
        from dspy.lm15 import RouterConfig, registered_providers

        if dspy.__version__ != "3.4.1" or registered_providers():
            return plain
        selection = select_backend(plain)
    except Exception:  # anything DSPy itself would refuse or route elsewhere: its own path decides
        return plain
    route = selection.resolution
    if not selection.native or route is None or route.declared:
        return plain
    clients = selection.clients
    url = clients.get("api_base") or clients.get("base_url")
    config = RouterConfig(
        api_keys={route.provider: clients["api_key"]} if "api_key" in clients else None,
        base_urls={route.provider: url} if url else None,
        timeouts=timeouts_for(clients.get("timeout")),
    )
    # The sync engine is DSPy's own native one (it routes per call; nothing here calls it
    # on a hot path); the async one keeps its route.
    return dspy.LM(
        model,
        engine=LM15Engine(config, model_type=plain.model_type),
        async_engine=RoutedAsyncEngine(config, route.provider, route.model),
        cache=cache,
        num_retries=num_retries,
    )
