"""Memoized model-metadata lookups for DSPy 3.4's per-call pricing and capability checks.

DSPy prices every response and checks the model's capabilities on every call through
`dspy.clients.model_metadata.model_info`. For a model name its bundled snapshot does not know
(an OpenAI-compatible server's own name, say) that function scans every entry of the snapshot,
twice per call: measured here, a quarter of a process's CPU at ~100 calls/s. The snapshot is
read-only data, so the answer for a (provider, model, namespaces) triple never changes within a
process; this caches it and hands out copies, as the original does.

Applied once per process by `install()`; a DSPy without these names is left alone.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

logger = logging.getLogger("triage")

_MODULES = ("dspy.clients.model_metadata", "dspy.clients.costs", "dspy.clients.capabilities")
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    import importlib

    try:
        modules = [importlib.import_module(name) for name in _MODULES]
        original = modules[0].model_info
    except (ImportError, AttributeError):
        logger.debug("DSPy has no model_info to memoize; left as is")
        return

    @functools.lru_cache(maxsize=256)
    def _cached(provider: Any, model: Any, namespaces: tuple[str, ...] | None) -> dict[str, Any]:
        return original(provider, model, namespaces=namespaces)

    @functools.wraps(original)
    def model_info(provider: Any, model: Any, *, namespaces: Any = None) -> dict[str, Any]:
        key = tuple(namespaces) if namespaces is not None else None
        try:
            return copy.deepcopy(_cached(provider, model, key))
        except TypeError:  # an unhashable argument: no caching
            return original(provider, model, namespaces=namespaces)

    for module in modules:
        if getattr(module, "model_info", None) is original:
            module.model_info = model_info
