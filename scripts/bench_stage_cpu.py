"""CPU per LM call of one stage, in one process, against the simulated provider (no Ray).

Runs `TriageStage` on batches of 32 synthetic transcripts, two batches at a time under the
stage's own 32-request budget, against `tests/fake_provider.py` started as a separate process
(so its CPU is not counted), and prints calls/s and CPU milliseconds per call (user + system,
of this process). `--lm plain` gives the stage a plain `dspy.LM(...)` instead of the one
`triage.lm.build_lm` makes, to show what `triage.native_engine` saves; the memoized lookups
of `triage.dspy_speedups` are installed in both cases.

`--program optimized` runs the program in `optimized/triager.json` (its demos included) instead
of the default prompts.

Usage: python scripts/bench_stage_cpu.py [--calls 3000] [--latency 0.2] [--lm routed|plain]
       [--program default|optimized]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # DSPy's bundled price list, no network

import dspy  # noqa: E402
import pyarrow as pa  # noqa: E402
from bench import Provider  # noqa: E402

from triage import dspy_speedups  # noqa: E402
from triage.lm import ChatAdapter, LMSetup, build_lm  # noqa: E402
from triage.schema import WORKING_SCHEMA  # noqa: E402
from triage.settings import resolve_settings  # noqa: E402
from triage.stages import ProgramSource, StageConfig, TriageStage  # noqa: E402

BATCH = 32


def batch(start: int, rows: int) -> pa.Table:
    records = [
        {
            "call_id": f"c{i}",
            "transcript": f"Caller {i}: smoke coming from the house at {i % 900 + 10} Elm Street, case {i}.",
            "model": "openai/fake",
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }
        for i in range(start, start + rows)
    ]
    return pa.Table.from_pylist(records, schema=WORKING_SCHEMA)


async def run(stage: TriageStage, calls: int) -> list[str]:
    await stage(batch(0, 4))  # warm up: the client's connections, the caches
    errors: list[str] = []

    async def worker(first: int) -> None:
        for start in range(first, calls, 2 * BATCH):
            out = await stage(batch(start, min(BATCH, calls - start)))
            errors.extend(e for e in out.column("errors").to_pylist() if e)

    await asyncio.gather(worker(0), worker(BATCH))
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--lm", choices=("routed", "plain"), default="routed")
    parser.add_argument("--program", choices=("default", "optimized"), default="default")
    args = parser.parse_args()
    provider = Provider(args.latency, None)
    try:
        settings = resolve_settings(
            {"model": "openai/fake", "api_base": provider.url, "cache": False}, dotenv_path=None
        )
        if args.lm == "plain":
            dspy_speedups.install()  # build_lm installs them for the routed LM
            plain = dspy.LM("openai/fake", api_base=provider.url, api_key="bench", cache=False, num_retries=0)
            setup = LMSetup(plain, ChatAdapter)
        else:
            setup = build_lm(settings)
        program = (
            ProgramSource.load(ROOT / "optimized", TriageStage.program_file)
            if args.program == "optimized"
            else ProgramSource(None, "default prompts")
        )
        stage = TriageStage(
            StageConfig(settings=settings, program=program, in_flight=BATCH),
            lm_setup=setup,
        )
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        errors = asyncio.run(run(stage, args.calls))
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - started
    finally:
        provider.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(
        f"lm {args.lm}, {args.program} program: {args.calls} calls in {wall:.1f}s ({args.calls / wall:.0f}/s), "
        f"{1000 * cpu / args.calls:.2f} ms CPU per call, {len(errors)} row errors"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
