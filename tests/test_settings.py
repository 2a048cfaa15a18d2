"""Settings: flag > environment > .env > default, typed one-line errors, the key never shown."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import SecretStr

from tests.test_cli import triage_cli
from triage.cli import main
from triage.errors import ConfigError
from triage.settings import DEFAULT_MODEL, Settings, provider_of, resolve_settings, split_model


def test_precedence_flag_over_environment_over_dotenv_over_default(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "TRIAGE_MODEL=openai/from-dotenv\nTRIAGE_CONCURRENCY=3\nTRIAGE_LIMIT=9\nTRIAGE_REFLECTION_MODEL=openai/r-dotenv\n"
    )
    monkeypatch.setenv("TRIAGE_MODEL", "openai/from-env")
    monkeypatch.setenv("TRIAGE_CONCURRENCY", "5")
    settings = resolve_settings({"model": "openai/from-flag", "limit": None}, dotenv_path=dotenv)
    assert settings.model == "openai/from-flag"  # flag over environment and .env
    assert settings.concurrency == 5  # environment over .env, converted to int
    assert settings.limit == 9  # .env over default, and a None flag is "not given"
    assert settings.reflection_model == "openai/r-dotenv"  # the reflection model is a setting like the others
    assert settings.output == "output/triaged_calls"
    assert resolve_settings({}, dotenv_path=None).model == "openai/from-env"
    monkeypatch.delenv("TRIAGE_MODEL")
    assert resolve_settings({}, dotenv_path=None).model == DEFAULT_MODEL


def test_the_command_line_applies_the_same_precedence(tmp_path, monkeypatch, capsys):
    """Flags built from the fields reach Settings as text; the CLI's settings are what the command gets."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("TRIAGE_CONCURRENCY=3\nTRIAGE_REFLECTION_MODEL=openai/r-dotenv\n")
    monkeypatch.setenv("TRIAGE_REFLECTION_MODEL", "openai/r-env")
    seen = {}

    def fake_optimize(settings, options):
        seen["settings"] = settings
        return SimpleNamespace(line=lambda: "optimized")

    monkeypatch.setattr("triage.optimize.optimize", fake_optimize)
    assert main(["optimize", "--model", "openai/x", "--api-base", "http://127.0.0.1:1", "--output-dir", "here"]) == 0
    assert capsys.readouterr().out == "optimized\n"
    settings = seen["settings"]
    assert (settings.model, settings.optimized_dir, settings.concurrency) == ("openai/x", "here", 3)
    assert settings.reflection_model == "openai/r-env"


def test_provider_key_is_used_when_no_triage_key(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("OPENAI_API_KEY=sk-from-dotenv-123456\n")
    settings = resolve_settings({"model": "openai/gpt-4.1-mini"}, dotenv_path=dotenv)
    assert settings.api_key == SecretStr("sk-from-dotenv-123456")
    anthropic = resolve_settings({"model": "anthropic/claude-sonnet-4-6"}, dotenv_path=dotenv)
    assert anthropic.api_key is None  # OPENAI_API_KEY is not Anthropic's
    assert resolve_settings({}, dotenv_path=dotenv).api_key is None  # the embedded model takes no key
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-environment-7890")
    assert resolve_settings({"model": "openai/x"}, dotenv_path=dotenv).api_key.get_secret_value() == (
        "sk-from-environment-7890"
    )  # environment over .env for the provider's variable too
    monkeypatch.setenv("TRIAGE_MODEL", "anthropic/claude-sonnet-4-6")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-environment")
    assert resolve_settings({}, dotenv_path=dotenv).api_key.get_secret_value() == "sk-ant-from-environment"
    monkeypatch.setenv("TRIAGE_API_KEY", "k-explicit")
    explicit = resolve_settings({"model": "openai/x"}, dotenv_path=dotenv)
    assert explicit.api_key.get_secret_value() == "k-explicit"  # TRIAGE_API_KEY wins over the provider's


def test_the_provider_is_the_model_strings_prefix():
    assert provider_of("anthropic/claude-sonnet-4-6") == "anthropic"
    assert provider_of("openai/org/model") == "openai"
    assert provider_of("gpt-4.1-mini") == "openai"  # DSPy's default provider
    assert Settings(model=DEFAULT_MODEL).provider == "local"
    # The one parser also gives the model's name, which the price list is looked up by (triage.manifest).
    assert split_model("openai/org/model") == ("openai", "org/model")
    assert split_model("gpt-4.1-mini") == ("openai", "gpt-4.1-mini")


def test_the_key_never_shows(caplog, monkeypatch):
    key = "sk-very-secret-value-42"
    assert Settings().describe()["api_key"] is None
    monkeypatch.setenv("TRIAGE_API_KEY", key)
    settings = resolve_settings({"model": "openai/x"}, dotenv_path=None)
    assert isinstance(settings.api_key, SecretStr) and settings.api_key.get_secret_value() == key
    with caplog.at_level(logging.INFO):
        logging.getLogger("triage").info("settings %s %r", settings, settings)
    shown = (repr(settings), str(settings), f"{settings}", str(settings.describe()), settings.model_dump_json())
    for text in (*shown, caplog.text):
        assert key not in text
    assert settings.describe()["api_key"] == "****"
    with pytest.raises(ConfigError) as error:  # an invalid setting beside the key: the error names, never shows
        resolve_settings({"model": "openai/x", "concurrency": "0"}, dotenv_path=None)
    assert key not in str(error.value) and error.value.__suppress_context__  # no traceback chain to print
    with pytest.raises(ConfigError, match="^TRIAGE_API_KEY input should be a valid string$"):
        Settings(api_key=12345678901)  # an invalid key is named, not shown


def test_settings_travel_to_ray_actors_pickled_small_and_whole():
    settings = Settings(model="openai/x", api_key=SecretStr("sk-pickled-123456"), concurrency=7)
    data = pickle.dumps(settings)
    back = pickle.loads(data)
    assert back == settings and back.api_key.get_secret_value() == "sk-pickled-123456"
    assert len(data) < 1500


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"concurrency": "0"}, {}, "--concurrency / TRIAGE_CONCURRENCY must be at least 1, got '0'"),
        ({}, {"TRIAGE_CONCURRENCY": "many"}, "--concurrency / TRIAGE_CONCURRENCY must be a whole number, got 'many'"),
        ({"model": "gpt4"}, {}, "--model / TRIAGE_MODEL must be a DSPy model string"),
        ({}, {"TRIAGE_CACHE": "maybe"}, "TRIAGE_CACHE must be true or false, got 'maybe'"),
        ({"rpm": "0"}, {}, "--rpm / TRIAGE_RPM must be positive, got '0'"),
        ({}, {"TRIAGE_TIMEOUT": "soon"}, "TRIAGE_TIMEOUT must be a number, got 'soon'"),
        ({}, {"TRIAGE_REFLECTION_MODEL": "gpt"}, "--reflection-model / TRIAGE_REFLECTION_MODEL must be a DSPy"),
    ],
)
def test_bad_values_are_one_line_config_errors(monkeypatch, flags, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        resolve_settings(flags, dotenv_path=None)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_misspelt_variable_in_dotenv_is_an_error(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("TRIAGE_CONCURENCY=3\n")
    with pytest.raises(ConfigError, match="^TRIAGE_CONCURENCY is not a setting$"):
        resolve_settings({}, dotenv_path=dotenv)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--concurrency", "lots"], {}, "error: --concurrency / TRIAGE_CONCURRENCY must be a whole number, got 'lots'"),
        (["--rpm", "-1"], {}, "error: --rpm / TRIAGE_RPM must be positive, got '-1'"),
        ([], {"TRIAGE_LIMIT": "ten"}, "error: --limit / TRIAGE_LIMIT must be a whole number, got 'ten'"),
        ([], {"TRIAGE_API_KEY": "sk-leaky-000111222", "TRIAGE_TIMEOUT": "0"}, "error: TRIAGE_TIMEOUT must be positive"),
    ],
)
def test_the_command_line_reports_a_bad_value_in_one_line_with_exit_2(tmp_path, args, env, message):
    result = triage_cli("run", *args, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "sk-leaky" not in result.stderr + result.stdout


def test_help_is_built_from_the_fields(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("concurrency", "limit", "rpm", "model", "overwrite"):
        field = Settings.model_fields[name]
        assert " ".join(f"{field.description} [TRIAGE_{name.upper()}; default: {field.default}]".split()) in text
    assert "--concurrency N" in text and "--rpm X" in text and "--model TEXT" in text


def test_env_example_names_every_setting():
    text = (Path(__file__).resolve().parents[1] / ".env.example").read_text()
    missing = [name for name in Settings.model_fields if f"# TRIAGE_{name.upper()}=" not in text]
    assert not missing, f".env.example lacks {missing}"
