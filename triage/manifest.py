"""The run manifest written beside the output (`_manifest.json`): what ran, on what, and what it cost.

It never holds a secret: settings come from `Settings.describe()`, which masks the key.
Prices and cost estimates are `triage.cost`'s (re-exported here for older imports).
"""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from triage.atomic import atomic_write_text
from triage.cost import estimated_cost, price_per_token

__all__ = ["estimated_cost", "now_iso", "package_versions", "price_per_token", "write_manifest"]

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


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write atomically (temporary name, then rename), like the part files."""
    path = folder / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
