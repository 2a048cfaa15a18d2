"""The CLI's stderr filter drops Ray's one false alarm and passes everything else, even a crash's last line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RAY_LINE = (
    "[2026-12-01 09:18:20,490 E 6865 6865] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(TriageStage))' and ID: '9c3c5625f27c303298ef820201000000' has constructor "
    "arguments in the object store and max_restarts > 0. If the arguments in the object store go out of "
    "scope or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 "
    "for more details."
)
OTHER_ERROR = "[2026-12-01 09:18:21,000 E 6865 6865] core_worker.cc:999: Failed to register actor. Error message: x"


def run_python(body: str) -> subprocess.CompletedProcess:
    """Runs `body` inside `without_ray_false_alarm()` in a fresh interpreter, stderr captured."""
    script = "import os, sys\nfrom triage.native_stderr import without_ray_false_alarm\n" + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "", "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )


def test_only_rays_false_alarm_is_dropped_from_native_stderr():
    result = run_python(
        f"""
        with without_ray_false_alarm():
            os.write(2, {(RAY_LINE + chr(10)).encode()!r})
            os.write(2, {(OTHER_ERROR + chr(10)).encode()!r})
            os.write(2, b"a C library's warning\\n")
            print("progress from python", file=sys.stderr)
        print("after", file=sys.stderr)
        os.write(2, {(RAY_LINE + chr(10)).encode()!r})  # outside the block: shown
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert sorted(lines[:3]) == sorted([OTHER_ERROR, "a C library's warning", "progress from python"])
    assert lines[3:] == ["after", RAY_LINE]


def test_a_native_line_written_just_before_a_hard_exit_still_shows():
    result = run_python(
        """
        with without_ray_false_alarm():
            os.write(2, b"F core_worker.cc:1: Check failed: the last words\\n")
            os._exit(3)
        """
    )
    assert result.returncode == 3
    assert result.stderr == "F core_worker.cc:1: Check failed: the last words\n"
