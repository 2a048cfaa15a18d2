"""Every setting in one typed object, resolved in one place.

Precedence: command-line flag > environment variable > `.env` file > default. The `.env`
file is read with `dotenv_values` (never loaded into `os.environ`), from an explicit path:
`python-dotenv`'s own search starts from the calling file's folder, not the working
directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from triage.errors import ConfigError

DEFAULT_MODEL = "local/smollm2-135m"
PROVIDER_KEY_VARIABLES = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


def provider_of(model: str) -> str:
    """The provider of a DSPy model string: the part before the first "/" (`openai` when there is none)."""
    return model.split("/", 1)[0] if "/" in model else "openai"


class Secret:
    """A string that never shows itself in a repr, a log line or an f-string."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _setting(default: Any, env: str, help: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"env": env, "help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """What a run needs to know. Each field names its environment variable."""

    input: str = _setting(
        "data/calls.jsonl", "TRIAGE_INPUT", "input file, folder or glob (.jsonl .json .csv .parquet .txt)"
    )
    output: str = _setting(
        "output/triaged_calls", "TRIAGE_OUTPUT", "output Parquet folder (replaced at the end of a run)"
    )
    model: str = _setting(DEFAULT_MODEL, "TRIAGE_MODEL", "DSPy model string, e.g. openai/gpt-4.1-mini")
    api_base: str | None = _setting(None, "TRIAGE_API_BASE", "base URL of an OpenAI-compatible server")
    api_key: Secret | None = _setting(
        None, "TRIAGE_API_KEY", "API key (else the provider's usual variable, e.g. OPENAI_API_KEY)", secret=True
    )
    optimized_dir: str = _setting("optimized", "TRIAGE_OPTIMIZED_DIR", "folder of optimized programs")
    concurrency: int = _setting(16, "TRIAGE_CONCURRENCY", "LM requests in flight in total, both stages together")
    limit: int | None = _setting(None, "TRIAGE_LIMIT", "triage only the first N input rows")
    rpm: float | None = _setting(None, "TRIAGE_RPM", "LM requests per minute for the whole run, all workers together")
    tpm: float | None = _setting(None, "TRIAGE_TPM", "LM tokens per minute for the whole run, all workers together")
    max_retries: int = _setting(5, "TRIAGE_MAX_RETRIES", "retries of a transient LM error (429, 5xx, timeout)")
    validation_attempts: int = _setting(3, "TRIAGE_VALIDATION_ATTEMPTS", "tries to get an answer that validates")
    timeout: float = _setting(60.0, "TRIAGE_TIMEOUT", "seconds before one LM request times out")
    cache: bool = _setting(True, "TRIAGE_CACHE", "reuse DSPy's cache of identical LM requests")
    overwrite: bool = _setting(False, "TRIAGE_OVERWRITE", "start the output afresh instead of resuming it")
    commit_seconds: float = _setting(
        30.0, "TRIAGE_COMMIT_SECONDS", "finished rows are committed to the output at least this often"
    )
    max_transcript_chars: int = _setting(
        20000, "TRIAGE_MAX_TRANSCRIPT_CHARS", "longer transcripts are cut to this length (noted in errors)"
    )

    def describe(self) -> dict[str, Any]:
        """The settings as plain values, secrets masked: safe to log or write to a manifest."""
        return {
            f.name: ("****" if f.metadata["secret"] and getattr(self, f.name) else getattr(self, f.name))
            for f in fields(self)
        }

    @property
    def provider(self) -> str:
        return provider_of(self.model)


def setting_help() -> list[tuple[str, str, str, Any]]:
    """(field, environment variable, help, default) for every setting, for docs and --help."""
    return [(f.name, f.metadata["env"], f.metadata["help"], f.default) for f in fields(Settings)]


def _convert(name: str, raw: Any, target: str) -> Any:
    if raw is None or isinstance(raw, Secret):
        return raw
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    try:
        if target in ("int", "int | None"):
            return None if text == "" and "None" in target else int(text)
        if target in ("float", "float | None"):
            return None if text == "" and "None" in target else float(text)
        if target == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
    except ValueError:
        raise ConfigError(f"{name} must be {target.replace(' | None', '')}, got {text!r}") from None
    if target == "Secret | None":
        return Secret(text) if text else None
    if "None" in target:
        return text or None
    return text


def resolve_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | Path | None = ".env",
) -> Settings:
    """Combine flags, environment, `.env` and defaults into validated Settings.

    `flags` maps field names to values; a None value means "not given". A provider key
    (`OPENAI_API_KEY`, `ANTHROPIC_API_KEY`) found in the environment or `.env` becomes
    `api_key` when `TRIAGE_API_KEY` is not set, so workers get it from the settings object
    rather than from their own environment.
    """
    environ = os.environ if environ is None else environ
    dotenv = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None} if dotenv_path else {}
    flags = {k: v for k, v in (flags or {}).items() if v is not None}

    def lookup(variable: str) -> str | None:
        return environ.get(variable, dotenv.get(variable))

    values: dict[str, Any] = {}
    for f in fields(Settings):
        env_name = f.metadata["env"]
        if f.name in flags:
            raw = flags[f.name]
        elif lookup(env_name) is not None:
            raw = lookup(env_name)
        else:
            continue
        values[f.name] = _convert(f"--{f.name.replace('_', '-')} / {env_name}", raw, str(f.type))

    settings = Settings(**values)
    if settings.api_key is None:
        provider_variable = PROVIDER_KEY_VARIABLES.get(settings.provider)
        provider_key = lookup(provider_variable) if provider_variable else None
        if provider_key:
            settings = replace(settings, api_key=Secret(provider_key))
    _validate(settings)
    return settings


def _validate(settings: Settings) -> None:
    if settings.concurrency < 1:
        raise ConfigError(f"--concurrency / TRIAGE_CONCURRENCY must be at least 1, got {settings.concurrency}")
    if settings.limit is not None and settings.limit < 0:
        raise ConfigError(f"--limit / TRIAGE_LIMIT must be 0 or more, got {settings.limit}")
    for name in ("rpm", "tpm"):
        value = getattr(settings, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name} / TRIAGE_{name.upper()} must be positive, got {value}")
    if settings.max_retries < 0:
        raise ConfigError(f"TRIAGE_MAX_RETRIES must be 0 or more, got {settings.max_retries}")
    if settings.validation_attempts < 1:
        raise ConfigError(f"TRIAGE_VALIDATION_ATTEMPTS must be at least 1, got {settings.validation_attempts}")
    if settings.max_transcript_chars < 1:
        raise ConfigError(f"TRIAGE_MAX_TRANSCRIPT_CHARS must be at least 1, got {settings.max_transcript_chars}")
    if settings.commit_seconds <= 0:
        raise ConfigError(f"TRIAGE_COMMIT_SECONDS must be positive, got {settings.commit_seconds}")
    if settings.timeout <= 0:
        raise ConfigError(f"TRIAGE_TIMEOUT must be positive, got {settings.timeout}")
    if "/" not in settings.model:
        raise ConfigError(
            f"--model / TRIAGE_MODEL must be a DSPy model string like 'openai/gpt-4.1-mini' or "
            f"'{DEFAULT_MODEL}', got {settings.model!r}"
        )
