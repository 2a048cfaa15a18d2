"""Settings: flag > environment > .env > default, secrets never shown."""

from __future__ import annotations

import pytest

from triage.errors import ConfigError
from triage.settings import DEFAULT_MODEL, Secret, Settings, provider_of, resolve_settings


def test_precedence_flag_over_environment_over_dotenv_over_default(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("TRIAGE_MODEL=openai/from-dotenv\nTRIAGE_CONCURRENCY=3\nTRIAGE_LIMIT=9\n")
    env = {"TRIAGE_MODEL": "openai/from-env", "TRIAGE_CONCURRENCY": "5"}
    settings = resolve_settings({"model": "openai/from-flag"}, environ=env, dotenv_path=dotenv)
    assert settings.model == "openai/from-flag"
    assert settings.concurrency == 5
    assert settings.limit == 9
    assert settings.output == Settings().output
    assert resolve_settings({}, environ={}, dotenv_path=None).model == DEFAULT_MODEL


def test_provider_key_is_used_when_no_triage_key(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("OPENAI_API_KEY=sk-from-dotenv-123456\n")
    settings = resolve_settings({"model": "openai/gpt-4.1-mini"}, environ={}, dotenv_path=dotenv)
    assert settings.api_key == Secret("sk-from-dotenv-123456")
    explicit = resolve_settings({"model": "openai/x"}, environ={"TRIAGE_API_KEY": "k-explicit"}, dotenv_path=dotenv)
    assert explicit.api_key.reveal() == "k-explicit"
    anthropic = resolve_settings({"model": "anthropic/claude-sonnet-4-6"}, environ={}, dotenv_path=dotenv)
    assert anthropic.api_key is None


def test_the_provider_is_the_model_strings_prefix():
    assert provider_of("anthropic/claude-sonnet-4-6") == "anthropic"
    assert provider_of("openai/org/model") == "openai"
    assert provider_of("gpt-4.1-mini") == "openai"  # DSPy's default provider
    assert Settings(model=DEFAULT_MODEL).provider == "local"


def test_secret_never_shows():
    settings = Settings(api_key=Secret("sk-very-secret-value"))
    for text in (repr(settings), str(settings), f"{settings}", str(settings.describe())):
        assert "sk-very-secret-value" not in text


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"concurrency": 0}, {}, "at least 1"),
        ({}, {"TRIAGE_CONCURRENCY": "many"}, "TRIAGE_CONCURRENCY must be int"),
        ({"model": "gpt4"}, {}, "DSPy model string"),
        ({}, {"TRIAGE_CACHE": "maybe"}, "TRIAGE_CACHE must be bool"),
    ],
)
def test_bad_values_are_config_errors(flags, env, message):
    with pytest.raises(ConfigError, match=message):
        resolve_settings(flags, environ=env, dotenv_path=None)
