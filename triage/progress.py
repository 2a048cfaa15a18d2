"""One live progress line for a long run: rows done / total, rows/s, errors, tokens, time left.

On a terminal the line is redrawn in place (at most a few times a second); elsewhere (CI, a
log file) a plain line is written every `log_every` seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _count(value: int) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    return str(value)


class Progress:
    def __init__(
        self,
        total: int,
        *,
        label: str = "triage",
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_every: float = 10.0,
    ) -> None:
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.clock = clock
        self.log_every = log_every
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = self.errors = self.tokens = 0
        self.started = clock()
        self._last_shown = float("-inf")

    def update(self, rows: int, errors: int = 0, tokens: int = 0) -> None:
        self.done += rows
        self.errors += errors
        self.tokens += tokens
        now = self.clock()
        if now - self._last_shown >= (0.25 if self.live else self.log_every):
            self._show(now)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = f", {_duration((self.total - self.done) / rate)} left" if rate > 0 and self.done < self.total else ""
        return (
            f"{self.label}: {self.done}/{self.total} rows{share}, {rate:.1f} rows/s, "
            f"{self.errors} with errors, {_count(self.tokens)} tokens{left}"
        )

    def _show(self, now: float) -> None:
        self._last_shown = now
        if self.live:
            self.stream.write("\r\x1b[2K" + self.line(now))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self._last_shown > float("-inf"):
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
