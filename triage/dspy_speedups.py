"""Memoized lookups on DSPy 3.4's per-call path: model metadata, and pydantic type adapters.

DSPy prices every response and checks the model's capabilities on every call through
`dspy.clients.model_metadata.model_info`. For a model name its bundled snapshot does not know
(an OpenAI-compatible server's own name, say) that function scans every entry of the snapshot,
twice per call: measured here, a quarter of a process's CPU at ~100 calls/s. The snapshot is
read-only data, so the answer for a (provider, model, namespaces) triple never changes within a
process; this caches it and hands out copies, as the original does.

The adapters' value formatting and parsing (`dspy.adapters.utils`) build a pydantic
`TypeAdapter` for the value's type on every field of every call, and building one costs far
more than using it (about 10% of a stage's CPU per call, measured). A TypeAdapter for a
given type is the same every time, so that module gets a cached constructor.

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
    _cache_type_adapters()


def _cache_type_adapters() -> None:
    import dspy.adapters.utils as adapter_utils
    from pydantic import TypeAdapter

    if getattr(adapter_utils, "TypeAdapter", None) is not TypeAdapter:
        return

    @functools.lru_cache(maxsize=512)
    def _cached(annotation: Any) -> TypeAdapter:
        return TypeAdapter(annotation)

    def cached_type_adapter(annotation: Any, *args: Any, **kwargs: Any) -> TypeAdapter:
        if args or kwargs:
            return TypeAdapter(annotation, *args, **kwargs)
        try:
            return _cached(annotation)
        except TypeError:  # an unhashable annotation: built each time, as before
            return TypeAdapter(annotation)

    adapter_utils.TypeAdapter = cached_type_adapter
