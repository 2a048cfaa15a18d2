"""The embedded model's errors: one family under `LocalModelError`."""

from __future__ import annotations


class LocalModelError(RuntimeError):
    """The embedded model cannot be used (missing weights, bad request, context too long)."""


class LocalModelNotInstalled(LocalModelError, FileNotFoundError):
    pass


class LocalContextLengthError(LocalModelError):
    pass
