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

Applied once per process by `install()`, and only on the DSPy version they were written and
measured for (`PATCHED_FOR`): any other version runs plain DSPy. docs/dspy-patches.md lists
every place this project reaches into DSPy, and why.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

logger = logging.getLogger("triage")

_MODULES = ("dspy.clients.model_metadata", "dspy.clients.costs", "dspy.clients.capabilities")
PATCHED_FOR = "3.4.1"
_installed = False


def install() -> bool:
    """Apply the memoizations (once per process); False, and plain DSPy, on any other DSPy version."""
    global _installed
    import dspy

    if dspy.__version__ != PATCHED_FOR:
        logger.debug("DSPy %s is not %s: its lookups are left as they are", dspy.__version__, PATCHED_FOR)
        return False
    if _installed:
        return True
    _installed = True
    import importlib

    try:
        modules = [importlib.import_module(name) for name in _MODULES]
        original = modules[0].model_info
    except (ImportError, AttributeError):
        logger.debug("DSPy has no model_info to memoize; left as is")
        return False

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
    return True


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
