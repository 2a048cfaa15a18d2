"""The processes a test started, found by their session, and stopped without touching any other.

A test starts a command with `start_new_session=True`, so the command's pid is also its session
id, and everything the command starts carries that session: a Ray driver's GCS, raylet and
workers (Ray puts workers in process groups of their own, but never in a new session), or the
daemons `ray start` leaves running. Signalling by session reaches exactly those processes: never
another Ray on the machine, nor a benchmark running beside the suite. (Linux keeps a session's
id from being reused while any process of it is alive.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, session) of a process from /proc/<pid>/stat, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[3])


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting to be reaped."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def session_processes(session: int) -> dict[int, bytes]:
    """The live processes of a session: pid -> command line (arguments joined by NUL bytes)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        if stat is None or stat[1] != session or stat[0] in ("Z", "X"):
            continue
        try:
            found[pid] = (entry / "cmdline").read_bytes()
        except OSError:
            continue
    return found


def wait_gone(pids: list[int] | set[int], timeout: float) -> bool:
    """Whether every one of `pids` has exited (or is a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def send(pid: int, session: int, signum: int) -> None:
    """Signal one process, only if it is still the one of `session` (a pidfd pins it against pid reuse)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        stat = _stat(pid)
        if stat is not None and stat[1] == session:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signum)
    finally:
        os.close(pidfd)


def signal_session(session: int, signum: int) -> list[int]:
    """Send `signum` to every live process of the session at once; the pids signalled."""
    pids = list(session_processes(session))
    for pid in pids:
        send(pid, session, signum)
    return pids


def stop_session(session: int, grace: float = 10.0) -> None:
    """SIGTERM every process of the session, then SIGKILL whatever is left after `grace` seconds."""
    if wait_gone(signal_session(session, signal.SIGTERM), grace):
        return
    deadline = time.monotonic() + 30
    while session_processes(session):  # a dying raylet may still start a worker: repeat until none is left
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of session {session} survived SIGKILL: {session_processes(session)}")
        wait_gone(signal_session(session, signal.SIGKILL), 5)
