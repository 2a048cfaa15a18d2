"""`tests.processes`: a session's processes are found and stopped, and nothing outside the session is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.processes import alive, send, session_processes, signal_session, stop_session

# A shell with two children, one of them in a process group of its own as Ray puts its workers.
FAMILY = f"sleep 60 & {sys.executable} -c 'import os, time; os.setpgid(0, 0); time.sleep(60)' & wait"
# The same, ignoring SIGTERM, as daemons that will not stop politely.
STUBBORN = "trap '' TERM; " + FAMILY


@pytest.fixture
def start():
    started: list[subprocess.Popen] = []

    def start(script: str, *, new_session: bool = True) -> subprocess.Popen:
        process = subprocess.Popen(["sh", "-c", script], start_new_session=new_session)
        started.append(process)
        return process

    yield start
    for process in started:  # the test's own processes, whatever it did to them
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        stop_session(process.pid, grace=0)


def wait_for_family(session: int) -> dict[int, bytes]:
    """The three processes of a FAMILY session, once its python child has its own process group."""
    for _ in range(200):
        found = session_processes(session)
        if len(found) == 3 and len({os.getpgid(pid) for pid in found}) == 2:
            return found
        time.sleep(0.05)
    raise AssertionError(f"session {session} has {session_processes(session)}")


def test_stop_session_stops_the_session_and_nothing_else(start):
    target, bystander = start(STUBBORN), start(STUBBORN)
    pids = wait_for_family(target.pid)  # two process groups in one session
    wait_for_family(bystander.pid)
    stop_session(target.pid, grace=0.5)  # SIGTERM is ignored: SIGKILL after the grace
    assert session_processes(target.pid) == {}
    assert not any(alive(pid) for pid in pids)
    assert len(session_processes(bystander.pid)) == 3 and alive(bystander.pid)


def test_signals_reach_only_processes_of_the_named_session(start):
    target, bystander = start(FAMILY), start("sleep 60")
    pids = wait_for_family(target.pid)
    send(bystander.pid, target.pid, signal.SIGKILL)  # not of that session: left alone
    assert alive(bystander.pid)
    assert sorted(signal_session(target.pid, signal.SIGKILL)) == sorted(pids)
    target.wait(timeout=10)
    assert target.returncode == -signal.SIGKILL and alive(bystander.pid)


def test_a_process_in_the_callers_session_is_not_in_a_new_one(start):
    child = start("exec sleep 60", new_session=False)
    assert child.pid not in session_processes(child.pid)  # its session is the caller's, not its own pid
