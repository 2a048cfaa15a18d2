"""`make bench`: the pipeline against a simulated provider, beside the designs it replaces.

For each scenario it starts `tests/fake_provider.py` in its own process (latency, optional
RPM limit answered with 429 + Retry-After), writes N synthetic transcripts, runs one design
as a fresh process and prints one line of figures:

- rows/s end to end (the process's wall time, startup included) and steady (rows over the
  span from the first to the last request the provider saw);
- the ceiling: min(concurrency / latency, rpm / 60) / 2 calls per row, and steady / ceiling;
- 429s answered (count and share of requests), peak requests in flight at the provider;
- time from process start to the first request;
- peak memory of the process and all its descendants (Ray's included), as the sum of PSS
  (proportional set size: shared pages split between the processes that share them).

Every design names the same model, `--model` (the simulated provider answers whatever the
name). The default is a name DSPy's bundled model table knows, as a real run's would be: for
a name it does not know, plain DSPy scans the whole table twice per call, which more than
halved the plain-DSPy design's rate here (47 against 90 rows/s over 3,000 rows).

Whether the simulated provider itself keeps up with this load: `scripts/bench_provider.py`.

Usage: python scripts/bench.py [--rows N] [--latency S] [--concurrency C] [--rpm R] [--designs a,b,c]
       [--model openai/gpt-4.1-mini]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGNS = ("triage", "dspy-async", "original")
DEFAULT_MODEL = "openai/gpt-4.1-mini"


@dataclass
class Result:
    design: str
    rows: int
    rows_out: int
    exactly_once: bool  # every input call_id is in the output once, and nothing else is
    wall: float
    stats: dict
    first_request_after: float | None
    peak_pss_mb: float
    returncode: int

    def steady(self) -> float | None:
        first, last = self.stats.get("first_request_monotonic"), self.stats.get("last_request_monotonic")
        if first is None or last is None or last <= first:
            return None
        return self.rows / (last - first)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(_children(current))
    return found


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_kb = pid, interval, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            pids = _tree(self.pid)  # Ray's daemons and workers descend from the driver
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in pids))
            self._done.wait(self.interval)

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak_kb / 1024


class Provider:
    def __init__(self, latency: float, rpm: float | None) -> None:
        command = [sys.executable, "-m", "tests.fake_provider", "--latency", str(latency)]
        if rpm:
            command += ["--rpm", str(rpm), "--retry-after", "1"]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"fake provider did not start: {line!r}")
        self.url = line.split()[1]

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/_fake/stats") as response:
            return json.load(response)

    def reset(self) -> None:
        request = urllib.request.Request(self.url.removesuffix("/v1") + "/_fake/reset", method="POST")
        urllib.request.urlopen(request).read()

    def close(self) -> None:
        self.process.terminate()
        self.process.communicate(timeout=30)  # it prints its final stats on the way out


def write_input(path: Path, rows: int) -> None:
    with path.open("w") as handle:
        for i in range(rows):
            handle.write(
                json.dumps(
                    {
                        "call_id": f"b{i:07d}",
                        "transcript": f"Caller {i}: a neighbour at {i % 900 + 10} Elm Street "
                        f"reports smoke and a man shouting, case {i}.",
                    }
                )
                + "\n"
            )


def run_design(
    design: str,
    provider: Provider,
    input_path: Path,
    output: Path,
    concurrency: int,
    rpm: float | None,
    model: str = DEFAULT_MODEL,
) -> Result:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TRIAGE_CACHE": "false"}
    env.pop("RAY_ADDRESS", None)
    if design == "triage":
        command = [
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
            provider.url,
            "--concurrency",
            str(concurrency),
            "--overwrite",
        ]
        if rpm:
            command += ["--rpm", str(int(rpm))]
    else:
        command = [
            sys.executable,
            str(ROOT / "scripts" / "baselines.py"),
            design,
            str(input_path),
            str(output),
            provider.url,
            str(concurrency),
            model,
        ]
    provider.reset()
    started_wall = time.time()
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = MemorySampler(process.pid)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.monotonic() - started
    peak = sampler.stop()
    if process.returncode:
        sys.stderr.write(f"{design} failed:\n{stderr[-2000:]}\n")
    stats = provider.stats()
    first = stats.get("first_request_wall")
    import pyarrow.dataset as pads

    ids = pads.dataset(str(output), format="parquet").to_table(columns=["call_id"]) if output.exists() else None
    out_ids = ids.column("call_id").to_pylist() if ids is not None else []
    rows_out = len(out_ids)
    input_ids = [json.loads(line)["call_id"] for line in input_path.open()]
    exactly_once = rows_out == len(input_ids) and set(out_ids) == set(input_ids)
    return Result(
        design,
        len(input_ids),
        rows_out,
        exactly_once,
        wall,
        stats,
        (first - started_wall) if first else None,
        peak,
        process.returncode,
    )


def report(result: Result, concurrency: int, latency: float, rpm: float | None) -> str:
    ceiling = min(concurrency / latency, (rpm / 60) if rpm else float("inf")) / 2
    steady = result.steady()
    requests = max(result.stats.get("requests", 0), 1)
    too_many = result.stats.get("outcomes", {}).get("429", 0)
    first = f"{result.first_request_after:.1f}s" if result.first_request_after is not None else "n/a"
    span = (result.stats.get("last_request_monotonic") or 0) - (result.stats.get("first_request_monotonic") or 0)
    mean_in_flight = result.stats.get("in_flight_seconds", 0.0) / span if span > 0 else 0.0
    return (
        f"{result.design:<11} rows {result.rows_out}/{result.rows}"
        f" ({'each exactly once' if result.exactly_once else 'NOT exactly once'})"
        f"  end-to-end {result.rows / result.wall:6.1f} rows/s"
        f"  steady {steady or 0:6.1f} rows/s  ceiling {ceiling:6.1f} ({(steady or 0) / ceiling:4.0%})"
        f"  429s {too_many} ({too_many / requests:.2%})"
        f"  in flight peak {result.stats.get('max_in_flight')} mean {mean_in_flight:.1f}"
        f"  first request {first}  peak memory {result.peak_pss_mb:,.0f} MB  wall {result.wall:.1f}s"
        + ("" if result.returncode == 0 else f"  EXIT {result.returncode}")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rpm", type=float, default=None)
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model name every design sends")
    args = parser.parse_args()
    print(
        f"# {args.rows} rows, {args.latency * 1000:.0f} ms latency, {args.concurrency} in flight"
        + (f", {args.rpm:.0f} rpm" if args.rpm else "")
        + f", {os.cpu_count()} cores, model {args.model}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="triage-bench-") as folder:
        input_path = Path(folder) / "calls.jsonl"
        write_input(input_path, args.rows)
        provider = Provider(args.latency, args.rpm)
        try:
            for design in args.designs.split(","):
                result = run_design(
                    design,
                    provider,
                    input_path,
                    Path(folder) / f"out-{design}",
                    args.concurrency,
                    args.rpm,
                    args.model,
                )
                print(report(result, args.concurrency, args.latency, args.rpm), flush=True)
        finally:
            provider.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
