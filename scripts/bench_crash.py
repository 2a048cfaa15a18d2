"""What a crash costs: requests sent for a run killed with SIGKILL mid-way and then run again.

Starts `tests/fake_provider.py` (its own process, `--latency`), writes N synthetic rows, runs
`python -m triage run` with DSPy's cache off (`TRIAGE_CACHE=false`, as on a cluster where each
node has its own cache), and once the provider has seen `--kill-after` requests SIGKILLs every
process of the run (the driver and its Ray, as a power cut would). Then it runs the same
command again to the end, and prints one line: requests sent in total against the 2 x N a
clean run needs (one per stage and row), and whether the output holds every row exactly once.

Usage: python scripts/bench_crash.py [--rows 2000] [--latency 0.2] [--kill-after 2000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench import DEFAULT_MODEL, Provider, write_input  # noqa: E402
from tests.processes import session_processes, signal_session, wait_gone  # noqa: E402


def triage_command(input_path: Path, output: Path, url: str, concurrency: int, model: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "triage",
        "run",
        "--input",
        str(input_path),
        "--output",
        str(output),
        "--model",
        model,
        "--api-base",
        url,
        "--concurrency",
        str(concurrency),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--kill-after", type=int, default=2000, help="requests the provider sees before the kill")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIAGE_", "RAY_ADDRESS"))}
    env.update(TRIAGE_CACHE="false", LITELLM_LOCAL_MODEL_COST_MAP="True")
    provider = Provider(args.latency, None)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-crash-") as folder:
            input_path, output = Path(folder) / "calls.jsonl", Path(folder) / "out"
            write_input(input_path, args.rows)
            command = triage_command(input_path, output, provider.url, args.concurrency, args.model)
            first = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
            )
            while provider.stats()["requests"] < args.kill_after:
                if first.poll() is not None:
                    raise SystemExit(f"the first run ended before the kill: {first.stderr.read()[-2000:]!r}")
                time.sleep(0.05)
            at_kill = provider.stats()["requests"]
            pids = signal_session(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
            if not wait_gone(pids, 60) or session_processes(first.pid):
                raise SystemExit("some processes of the killed run survived")
            after_kill = provider.stats()["requests"]  # requests still arriving as the processes died
            started = time.monotonic()
            second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            if second.returncode:
                raise SystemExit(f"the second run failed: {second.stderr[-2000:]}")
            total = provider.stats()["requests"]

            import pandas as pd

            frame = pd.read_parquet(output, columns=["call_id"])
            exactly_once = len(frame) == args.rows and frame["call_id"].is_unique
    finally:
        provider.close()
    needed = 2 * args.rows
    print(
        json.dumps(
            {
                "rows": args.rows,
                "latency": args.latency,
                "killed_at_requests": at_kill,
                "requests_first_run": after_kill,
                "requests_second_run": total - after_kill,
                "requests_total": total,
                "needed": needed,
                "ratio": round(total / needed, 3),
                "second_run_seconds": round(time.monotonic() - started, 1),
                "second_run_summary": second.stdout.strip(),
                "exactly_once": exactly_once,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
