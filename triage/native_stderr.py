"""Keep one false alarm of Ray's off a run's terminal; every other byte of stderr passes.

Ray Data starts each actor-pool map worker with two constructor arguments it has put in the
object store itself (the DataContext and the map transformer, `ray.put` by the operator, which
holds both refs for the whole run) and, for fault tolerance, with `max_restarts=-1`. Ray's core
worker (`core_worker.cc`, actor creation) then logs at ERROR level, once per process, "Actor with
class name: 'MapWorker(...)' ... has constructor arguments in the object store and max_restarts > 0
..." (ray-project/ray#53727). The refs are the driver's own and outlive the actors, so restarts
work; a killed stage worker is restarted and only its rows are redone (tests/test_reliability.py).

Nothing in Ray or Ray Data turns that line off: the check has no setting; `max_restarts=0` turns
it off but a dead worker then fails the whole run; and the driver's C++ error sink is its stderr,
with a fixed ERROR threshold, so the only level that hides it (`RAY_BACKEND_LOG_LEVEL=fatal`)
hides every other error of every Ray process too. So the CLI sends the driver's native stderr
(file descriptor 2, where the C++ logger writes) through a small filter process that drops lines
matching `RAY_FALSE_ALARM` and copies everything else. Python's own `sys.stderr` (the progress
line, warnings, tracebacks) is kept on the terminal directly, so it stays a terminal (`isatty`).
The filter is a separate process, not a thread: a C++ fatal error written just before the driver
exits is still read and shown. The line stays in Ray's driver log (`python-core-driver-*.log`).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator

# The one line dropped: Ray's warning about a Ray Data map worker's own constructor arguments.
RAY_FALSE_ALARM = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*\)' and ID: '[0-9a-f]+' "
    rb"has constructor arguments in the object store and max_restarts > 0\."
)

# Runs as `python -I -S -c`: stdlib only, isolated from the project's path. Reads the pipe until
# every writer has closed it; ignores Ctrl-C so the driver's last words still get through.
_FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
drop = re.compile(sys.argv[1].encode())
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not drop.search(line):
        out.write(line)
        out.flush()
"""


@contextlib.contextmanager
def without_ray_false_alarm(wait: float = 5.0) -> Iterator[None]:
    """While open, native writes to fd 2 pass through the filter; Python's stderr goes straight out."""
    sys.stderr.flush()
    try:
        terminal = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep clean
        yield
        return
    read_end, write_end = os.pipe()
    try:
        dropper = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER, RAY_FALSE_ALARM.pattern.decode()],
            stdin=read_end,
            stdout=terminal,
            stderr=terminal,
        )
    except OSError:
        for fd in (terminal, read_end, write_end):
            os.close(fd)
        yield  # no filter: the line shows, nothing else changes
        return
    os.close(read_end)
    python_stderr = sys.stderr
    # Left open afterwards: logging handlers made meanwhile (Ray's) may keep writing to it.
    sys.stderr = os.fdopen(
        os.dup(terminal), "w", buffering=1, encoding=python_stderr.encoding, errors="backslashreplace"
    )
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(terminal, 2)  # this process's last write end of the pipe closes: the filter reads to the end
        os.close(terminal)
        # A process started meanwhile may still hold the pipe: then the filter ends when that one does.
        with contextlib.suppress(subprocess.TimeoutExpired):
            dropper.wait(timeout=wait)
