"""One error family. The CLI turns a TriageError into a one-line message and exit code 2."""

from __future__ import annotations

import re
from collections.abc import Iterable


class TriageError(Exception):
    """A run could not start or finish; the message says what to fix."""


class ConfigError(TriageError):
    """A setting (flag, environment variable or .env entry) is invalid."""


class InputError(TriageError):
    """The input file, folder or glob cannot be read as transcripts."""


# Shapes of provider keys and bearer tokens, masked in any text that leaves a worker.
_KEY_PATTERNS = re.compile(
    r"(sk-[A-Za-z0-9_\-]{8,}|sk-ant-[A-Za-z0-9_\-]{8,}|(?i:bearer)\s+[A-Za-z0-9._\-]{8,}|"
    r"(?i:api[_-]?key)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9._\-]{8,})"
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask known secrets and anything shaped like an API key in `text`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "****")
    return _KEY_PATTERNS.sub("****", text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its class name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
