"""Every setting in one typed object, resolved in one place: `Settings`, a pydantic-settings model.

Precedence: command-line flag > environment variable > `.env` file > default. Flags are the
model's init arguments, so pydantic-settings applies the whole order itself; each field is
`TRIAGE_<NAME>` in the environment and in `.env` (read from the working directory, never
loaded into `os.environ`). The key is a `SecretStr`: masked in every repr, revealed only by
`get_secret_value()` where it is sent. A validation error is a one-line `ConfigError` naming
the flag and variable, never the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from triage.errors import ConfigError

ENV_PREFIX = "TRIAGE_"
DEFAULT_MODEL = "local/smollm2-135m"
PROVIDER_KEY_VARIABLES = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


def split_model(model: str) -> tuple[str, str]:
    """(provider, model name) of a DSPy model string, split at the first "/" (`openai` when there is none)."""
    provider, slash, name = model.partition("/")
    return (provider, name) if slash else ("openai", model)


def provider_of(model: str) -> str:
    """The provider of a DSPy model string: the part before the first "/" (`openai` when there is none)."""
    return split_model(model)[0]


def _flag(default: Any, description: str, **constraints: Any) -> Any:
    """A field the command line offers as `--name` (which commands offer it is the CLI's choice)."""
    return Field(default, description=description, json_schema_extra={"flag": True}, **constraints)


class Settings(BaseSettings):
    """What a run needs to know. Field `name` is flag `--name` and variable `TRIAGE_NAME`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,  # `TRIAGE_LIMIT=` means unset, as in .env.example
        extra="forbid",  # with match_prefix: a misspelt TRIAGE_ line in .env is an error; other lines are ignored
        dotenv_filtering="match_prefix",
        frozen=True,
        hide_input_in_errors=True,
    )

    input: str = _flag("data/calls.jsonl", "input file, folder or glob (.jsonl .json .csv .parquet .txt)")
    output: str = _flag("output/triaged_calls", "output Parquet folder (replaced at the end of a run)")
    model: str = _flag(DEFAULT_MODEL, "DSPy model string, e.g. openai/gpt-4.1-mini")
    api_base: str | None = _flag(None, "base URL of an OpenAI-compatible server")
    api_key: SecretStr | None = Field(
        None, description="API key (else the provider's usual variable, e.g. OPENAI_API_KEY)"
    )
    optimized_dir: str = _flag("optimized", "folder of optimized programs")
    concurrency: int = _flag(16, "LM requests in flight in total, both stages together", ge=1)
    limit: int | None = _flag(None, "triage only the first N input rows", ge=0)
    rpm: float | None = _flag(None, "LM requests per minute for the whole run, all workers together", gt=0)
    tpm: float | None = _flag(None, "LM tokens per minute for the whole run, all workers together", gt=0)
    max_cost: float | None = _flag(
        None, "USD this run may spend: refused above it (estimated first), stopped at it (counted)", gt=0
    )
    max_retries: int = Field(5, description="retries of a transient LM error (429, 5xx, timeout)", ge=0)
    validation_attempts: int = Field(3, description="tries to get an answer that validates", ge=1)
    timeout: float = Field(60.0, description="seconds before one LM request times out", gt=0)
    cache: bool = Field(True, description="reuse DSPy's cache of identical LM requests")
    overwrite: bool = _flag(False, "start the output afresh instead of resuming it")
    commit_seconds: float = Field(
        30.0, description="finished rows are committed to the output at least this often", gt=0
    )
    max_transcript_chars: int = Field(
        20000, description="longer transcripts are cut to this length (noted in errors)", ge=1
    )
    reflection_model: str | None = _flag(None, "optimize: GEPA's reflection / MIPROv2's prompt model")
    demos: str = _flag(
        "program",
        "demos each call shows: program (as compiled), fixed (the same for every call: a cacheable prompt) or none",
    )
    # Provider batch mode (`triage.batch`): same input, output and schema, half the price, answers within 24 h.
    batch: bool = _flag(False, "send the requests as provider batch jobs (OpenAI, Anthropic): half price, slower")
    no_wait: bool = _flag(False, "--batch: submit the jobs and exit; run the same command again to collect")
    batch_retry: str = _flag("online", "--batch: failed or invalid answers go again 'online' or in a new 'batch' job")
    batch_poll_seconds: float = Field(30.0, description="--batch: seconds between two looks at the jobs", gt=0)
    batch_max_requests: int | None = Field(
        None, description="--batch: requests per job (default: the provider's limit)", ge=1
    )
    batch_max_bytes: int | None = Field(
        None, description="--batch: bytes per job (default: the provider's limit)", ge=1
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_one_line(exc)) from None

    @field_validator("demos")
    @classmethod
    def _is_a_demo_choice(cls, value: str) -> str:
        from triage.programs import DEMO_CHOICES

        if value not in DEMO_CHOICES:
            raise ValueError(f"must be one of {', '.join(DEMO_CHOICES)}")
        return value

    @field_validator("model", "reflection_model")
    @classmethod
    def _is_a_dspy_model_string(cls, value: str | None) -> str | None:
        if value is not None and "/" not in value:
            raise ValueError(f"must be a DSPy model string like 'openai/gpt-4.1-mini' or '{DEFAULT_MODEL}'")
        return value

    @field_validator("batch_retry")
    @classmethod
    def _is_a_retry_path(cls, value: str) -> str:
        if value not in ("online", "batch"):
            raise ValueError("must be 'online' or 'batch'")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init arguments) > environment > `.env` > the provider's own key variable > default."""
        return init_settings, env_settings, dotenv_settings, _ProviderKey(settings_cls, env_settings, dotenv_settings)

    def describe(self) -> dict[str, Any]:
        """The settings as plain values, secrets masked: safe to log or write to a manifest."""
        return {
            name: ("****" if isinstance(value, SecretStr) else value)
            for name, value in ((name, getattr(self, name)) for name in type(self).model_fields)
        }

    @property
    def provider(self) -> str:
        return provider_of(self.model)


class _ProviderKey(PydanticBaseSettingsSource):
    """`api_key` from the provider's usual variable (OPENAI_API_KEY, ANTHROPIC_API_KEY), in the environment
    or `.env`, when no higher source set it: workers then get the key inside the settings object rather
    than from their own environment."""

    def __init__(self, settings_cls: type[BaseSettings], *sources: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._sources = sources

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, "", False  # everything happens in __call__, which sees the model chosen so far

    def __call__(self) -> dict[str, Any]:
        if "api_key" in self.current_state:
            return {}
        model = self.current_state.get("model", self.settings_cls.model_fields["model"].default)
        variable = PROVIDER_KEY_VARIABLES.get(provider_of(str(model)))
        for source in self._sources if variable else ():
            value = getattr(source, "env_vars", {}).get(variable.lower())
            if value:
                return {"api_key": value}
        return {}


def setting_name(name: str) -> str:
    """The flag and environment variable of a field, as error messages and --help name them."""
    variable = f"{ENV_PREFIX}{name.upper()}"
    field = Settings.model_fields.get(name)
    is_flag = field is not None and (field.json_schema_extra or {}).get("flag")
    return f"--{name.replace('_', '-')} / {variable}" if is_flag else variable


_PHRASES = {
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt:g}",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
    "extra_forbidden": "is not a setting",
}


def _one_line(exc: ValidationError) -> str:
    """Every problem of a ValidationError on one line, naming flag and variable; the key's value never shown."""
    problems = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else "settings"
        context = error.get("ctx") or {}
        if error["type"] == "value_error":
            phrase = str(context.get("error", error["msg"]))
        elif error["type"] == "greater_than" and context.get("gt") == 0:
            phrase = "must be positive"
        elif error["type"] in _PHRASES:
            phrase = _PHRASES[error["type"]].format(**context)
        else:
            phrase = error["msg"][:1].lower() + error["msg"][1:]
        secret = "SecretStr" in str(getattr(Settings.model_fields.get(name), "annotation", ""))
        shown = "" if secret or error["type"] == "extra_forbidden" else f", got {error['input']!r}"
        problems.append(f"{setting_name(name)} {phrase}{shown}")
    return "; ".join(problems)


def resolve_settings(flags: Mapping[str, Any] | None = None, *, dotenv_path: str | Path | None = ".env") -> Settings:
    """Settings from flags (field name -> value; None means "not given"), the environment, `.env` and defaults.

    `dotenv_path=None` reads no `.env` file. Raises ConfigError (one line) on an invalid value.
    """
    given = {name: value for name, value in (flags or {}).items() if value is not None}
    return Settings(_env_file=dotenv_path, **given)
