"""Tests are isolated: DSPy's cache lives in a temporary folder, settings are reset per test,
and no test can reach a real provider (only 127.0.0.1 servers the tests start)."""

from __future__ import annotations

import os
import tempfile

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="triage-dspy-cache-"))
for _variable in ("TRIAGE_MODEL", "TRIAGE_API_KEY", "TRIAGE_API_BASE", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
    os.environ.pop(_variable, None)

import dspy  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dspy_settings():
    with dspy.context(lm=None, adapter=None):
        yield
