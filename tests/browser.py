"""A real headless Chromium for tests: find it, open a page.

Chromium is not installed from here: `make setup` installs Debian's `chromium` (its `chromium`
target, which needs root and apt-get). Without it, `require_chromium` raises `BrowserError`
saying so, and the report's browser test is skipped with that reason.

`open_page` drives Chromium over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
JSON messages ending in a NUL byte on file descriptors 3 and 4), stdlib only. One launch
gives the rendered DOM, every console error, uncaught exception and failed or non-local
request, and a full-page screenshot. Every wait has a deadline; the browser is killed on exit.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "`make setup` installs Debian's chromium (`make chromium`; needs root and apt-get)"
LOCAL_SCHEMES = ("file:", "data:", "about:")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)


class BrowserError(Exception):
    """Chromium is missing or did not answer in time."""


def find_chromium() -> str | None:
    """The path of a Chromium binary on PATH (or Debian's /usr/bin/chromium), else None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def require_chromium() -> str:
    """The Chromium binary; `BrowserError` naming the install step when there is none."""
    path = find_chromium()
    if path is None:
        raise BrowserError(f"no Chromium on PATH ({', '.join(CANDIDATES)}): {INSTALL_HINT}")
    return path


@dataclass
class Page:
    """What Chromium saw when it opened a page."""

    dom: str = ""
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    screenshot: bytes = b""

    def remote_requests(self) -> list[str]:
        """Requests to anything but local files and inline data: the page must make none."""
        return [url for url in self.requests if not url.startswith(LOCAL_SCHEMES)]


class _Pipe:
    """The DevTools protocol over Chromium's pipe: send commands, collect events, with deadlines."""

    def __init__(self, process: subprocess.Popen[bytes], to_browser: int, from_browser: int, deadline: float) -> None:
        self.process = process
        self.to_browser = to_browser
        self.from_browser = from_browser
        self.deadline = deadline
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.selector = selectors.DefaultSelector()
        self.selector.register(from_browser, selectors.EVENT_READ)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send a command and wait for its result; events that arrive meanwhile are kept."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        """Wait for an event (or return it if it already arrived)."""
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._receive()
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("Chromium did not answer before the deadline")
            if not self.selector.select(timeout=left):
                continue
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium closed the DevTools pipe (exit code {self.process.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)


def _launch(binary: str, profile: str, window: tuple[int, int]) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start Chromium with the DevTools pipe on its fds 3 (commands in) and 4 (replies out)."""
    commands_read, commands_write = os.pipe()
    replies_read, replies_write = os.pipe()
    # The child's ends numbered 10 and above, so placing them on 3 and 4 cannot clobber one another.
    child_in, child_out = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_read, replies_write))

    def place_pipe_fds() -> None:  # in the child, before exec: only dup2 and close
        os.dup2(child_in, 3)
        os.dup2(child_out, 4)
        os.close(child_in)
        os.close(child_out)

    args = [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}", "about:blank"]
    process = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=False,  # closing would happen after place_pipe_fds and take fds 3 and 4 with it
        preexec_fn=place_pipe_fds,  # noqa: PLW1509
        start_new_session=True,
    )
    for fd in (commands_read, replies_write, child_in, child_out):
        os.close(fd)
    return process, commands_write, replies_read


def _record(page: Page, events: list[dict[str, Any]]) -> None:
    """Console errors, uncaught exceptions, failed loads and every request URL, from CDP events."""
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            page.console_errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            page.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            page.console_errors.append(f"{params['entry'].get('source')}: {params['entry'].get('text')}")
        elif method == "Network.requestWillBeSent":
            page.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed":
            page.console_errors.append(f"failed to load: {params.get('errorText')}")


def open_page(url: str, *, timeout: float = 60.0, window: tuple[int, int] = (1200, 1600)) -> Page:
    """Open `url` in headless Chromium and return its DOM, console errors, requests and a screenshot."""
    binary = require_chromium()
    with tempfile.TemporaryDirectory(prefix="triage-chromium-", ignore_cleanup_errors=True) as profile:
        process, to_browser, from_browser = _launch(binary, profile, window)
        pipe = _Pipe(process, to_browser, from_browser, time.monotonic() + timeout)
        try:
            return _drive(pipe, url)
        finally:
            _close(pipe)


def _close(pipe: _Pipe) -> None:
    """Ask Chromium to quit; kill its process group (it runs in a session of its own) if it does not."""
    with contextlib.suppress(BrowserError, OSError):
        pipe.deadline = time.monotonic() + 5
        pipe.send("Browser.close")
    for fd in (pipe.to_browser, pipe.from_browser):
        os.close(fd)
    with contextlib.suppress(subprocess.TimeoutExpired):
        pipe.process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pipe.process.pid, signal.SIGKILL)  # stray renderer or zygote processes of this launch
    if pipe.process.poll() is None:
        pipe.process.wait(timeout=10)


def _drive(pipe: _Pipe, url: str) -> Page:
    target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        pipe.send(f"{domain}.enable", session=session)
    pipe.events.clear()
    pipe.send("Page.navigate", {"url": url}, session=session)
    pipe.wait_for("Page.loadEventFired")
    dom = pipe.send("Runtime.evaluate", {"expression": "document.documentElement.outerHTML"}, session=session)
    shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
    page = Page(dom=dom["result"]["value"], screenshot=base64.b64decode(shot["data"]))
    _record(page, [e for e in pipe.events if e.get("sessionId") == session])
    return page


def save_screenshot(page: Page, path: str | Path) -> Path:
    """Write the page's screenshot as PNG and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(page.screenshot)
    return path
