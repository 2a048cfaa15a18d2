"""The run manifest written beside the output (`_manifest.json`): what ran, on what, and what it cost.

It never holds a secret: settings come from `Settings.describe()`, which masks the key.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from triage.atomic import atomic_write_text

MANIFEST_NAME = "_manifest.json"
PACKAGES = ("triage", "dspy", "ray", "pyarrow", "pandas", "tenacity", "cyllama")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def price_per_token(model: str) -> tuple[float, float] | None:
    """(input, output) USD per token from the price list bundled with DSPy, or None when unknown.

    That list is LiteLLM's, read through DSPy (importing LiteLLM itself costs seconds). The
    embedded model costs nothing; a model the list does not know gets no estimate.
    """
    if model.startswith("local/"):
        return (0.0, 0.0)
    provider, _, name = model.partition("/")
    if not name:
        return None
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # the bundled list, no download
    from dspy.clients.model_metadata import model_info

    entry = model_info(provider, name)
    if entry.get("input_cost_per_token") is None:
        return None
    return float(entry["input_cost_per_token"]), float(entry.get("output_cost_per_token") or 0.0)


# What a provider's batch API charges against its online price (OpenAI Batch API, Anthropic Message Batches).
BATCH_PRICE_FACTOR = {"openai": 0.5, "anthropic": 0.5}


def batch_price_factor(model: str) -> float | None:
    """The share of the online price a model's provider charges in its batch API, or None without one."""
    provider, _, name = model.partition("/")
    return BATCH_PRICE_FACTOR.get(provider) if name else None


def estimated_cost(model: str, prompt_tokens: int, completion_tokens: int, *, factor: float = 1.0) -> float | None:
    """USD at the model's listed price; `factor` scales it (`batch_price_factor` for batch jobs)."""
    prices = price_per_token(model)
    if prices is None:
        return None
    return round((prompt_tokens * prices[0] + completion_tokens * prices[1]) * factor, 6)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write atomically (temporary name, then rename), like the part files."""
    path = folder / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
