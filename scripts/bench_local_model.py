"""Benchmark the embedded model (triage.local) on the two ChainOfThought programs.

    .venv/bin/python scripts/bench_local_model.py                       # threads 1 and 2, 5 dev calls
    .venv/bin/python scripts/bench_local_model.py --threads 2 --rows 10 --reasoning-chars 160
    .venv/bin/python scripts/bench_local_model.py --threads 1 --programs optimized --input data/calls.jsonl

Per call it prints the seconds, prompt tokens (and how many were actually evaluated: the rest came
from the KV cache), generated tokens and the answer; per setting, the averages, generated tokens/s
(and per thread), and the process RSS after loading and at the end. The load average is printed
too: the model shares the CPU with everything else, so check it is low before trusting wall times;
with --threads 1 the CPU seconds per call approximate the wall time on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dspy  # noqa: E402

from triage.lm import GrammarJSONAdapter  # noqa: E402
from triage.local import (  # noqa: E402
    DEFAULT_FIELD_MAX_CHARS,
    DEFAULT_MAX_STRING_CHARS,
    DEFAULT_MAX_TOKENS,
    AsyncLocalEngine,
    LocalEngine,
)
from triage.programs import (  # noqa: E402
    CATEGORIES,
    PRIORITIES,
    CallTriager,
    DetailExtractor,
    ExtractDetails,
    TriageCall,
)
from triage.stages import ExtractDetailsStage, ProgramSource, TriageStage  # noqa: E402


def rss_mb() -> float:
    """Current resident set size (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_rows(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:n]


def modules(programs: Path | None) -> list[tuple[str, dspy.Module, type[dspy.Signature]]]:
    """The two programs: bare ChainOfThought modules, or those compiled in `programs` (demos included)."""
    if programs is None:
        return [
            ("TriageCall", dspy.ChainOfThought(TriageCall), TriageCall),
            ("ExtractDetails", dspy.ChainOfThought(ExtractDetails), ExtractDetails),
        ]
    built = []
    for name, module_class, stage, signature in (
        ("CallTriager", CallTriager, TriageStage, TriageCall),
        ("DetailExtractor", DetailExtractor, ExtractDetailsStage, ExtractDetails),
    ):
        module, source = module_class(), ProgramSource.load(programs, stage.program_file)
        if source.state is not None:
            module.load_state(source.state)
        print(f"  {name}: {source.label}")
        built.append((name, module, signature))
    return built


def run(threads: int, rows: list[dict], args: argparse.Namespace) -> dict:
    field_max = dict(DEFAULT_FIELD_MAX_CHARS)
    if args.reasoning_chars is not None:
        field_max["reasoning"] = args.reasoning_chars
    engine = LocalEngine(
        threads=threads, max_tokens=args.max_tokens, max_string_chars=args.max_string_chars, field_max_chars=field_max
    )
    lm = dspy.LM(
        engine.model,
        engine=engine,
        async_engine=AsyncLocalEngine(engine),
        cache=False,
        max_tokens=args.max_tokens,
        temperature=0.0,
        num_retries=0,
    )
    rss_before = rss_mb()
    started = time.perf_counter()
    engine.runtime.load()
    load_s = time.perf_counter() - started
    rss_loaded = rss_mb()
    print(f"\n== threads={threads}: load {load_s:.2f}s, RSS {rss_before:.0f} -> {rss_loaded:.0f} MB", flush=True)

    report: dict = {"threads": threads, "load_s": load_s, "rss_loaded_mb": rss_loaded, "modules": {}}
    with dspy.context(lm=lm, adapter=GrammarJSONAdapter()):
        for name, module, signature in modules(args.programs):
            calls = []
            for row in rows:
                t0, c0 = time.perf_counter(), cpu_seconds()
                prediction = module(transcript=row["transcript"])
                seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
                gen = engine.runtime.last_generation
                answer = {k: prediction[k] for k in signature.output_fields}
                calls.append(
                    {
                        "seconds": seconds,
                        "cpu": cpu,
                        "prompt": gen.prompt_tokens,
                        "evaluated": gen.evaluated_prompt_tokens,
                        "prompt_s": gen.prompt_seconds,
                        "completion": gen.completion_tokens,
                        "gen_s": gen.generation_seconds,
                        "finish": gen.finish_reason,
                    }
                )
                ok = ""
                if "priority" in answer:
                    valid = answer["priority"] in PRIORITIES and answer["category"] in CATEGORIES
                    ok = f" valid={valid} expected={row.get('priority')}/{row.get('category')}"
                print(
                    f"  {name:14s} {row['call_id']} {seconds:5.2f}s (cpu {cpu:5.2f}s) prompt {gen.prompt_tokens} "
                    f"(evaluated {gen.evaluated_prompt_tokens} in {gen.prompt_seconds:.2f}s) "
                    f"gen {gen.completion_tokens} in {gen.generation_seconds:.2f}s [{gen.finish_reason}]{ok}",
                    flush=True,
                )
                if args.verbose:
                    reasoning = str(prediction.get("reasoning", ""))
                    print(f"      {json.dumps({'reasoning': reasoning, **answer}, ensure_ascii=False)}")
            # The first call of a module also evaluates its instructions (then snapshotted): report both.
            warm = calls[1:] or calls
            gen_tokens = sum(c["completion"] for c in calls)
            gen_seconds = sum(c["gen_s"] for c in calls)
            summary = {
                "first_call_s": calls[0]["seconds"],
                "mean_s": statistics.mean(c["seconds"] for c in calls),
                "warm_mean_s": statistics.mean(c["seconds"] for c in warm),
                "warm_median_s": statistics.median(c["seconds"] for c in warm),
                "warm_mean_cpu_s": statistics.mean(c["cpu"] for c in warm),
                "mean_completion_tokens": statistics.mean(c["completion"] for c in calls),
                "mean_evaluated_prompt_warm": statistics.mean(c["evaluated"] for c in warm),
                "prompt_tok_per_s": sum(c["evaluated"] for c in calls) / max(1e-9, sum(c["prompt_s"] for c in calls)),
                "gen_tok_per_s": gen_tokens / max(1e-9, gen_seconds),
            }
            summary["gen_tok_per_s_per_thread"] = summary["gen_tok_per_s"] / threads
            report["modules"][name] = summary
            print(
                f"  -> {name}: first {summary['first_call_s']:.2f}s, warm mean {summary['warm_mean_s']:.2f}s "
                f"(median {summary['warm_median_s']:.2f}s, cpu {summary['warm_mean_cpu_s']:.2f}s), "
                f"{summary['mean_completion_tokens']:.0f} tokens/call, "
                f"generation {summary['gen_tok_per_s']:.1f} tok/s ({summary['gen_tok_per_s_per_thread']:.1f}/thread), "
                f"prompt eval {summary['prompt_tok_per_s']:.0f} tok/s",
                flush=True,
            )
    report["rss_end_mb"] = rss_mb()
    print(f"  RSS at end {report['rss_end_mb']:.0f} MB", flush=True)
    engine.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=5, help="first N calls of --input")
    parser.add_argument("--input", type=Path, default=ROOT / "data" / "dev.jsonl", help="JSONL calls [data/dev.jsonl]")
    parser.add_argument("--programs", type=Path, help="run the compiled programs in this folder (e.g. optimized)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--max-string-chars", type=int, default=DEFAULT_MAX_STRING_CHARS)
    parser.add_argument("--reasoning-chars", type=int, default=None)
    parser.add_argument("--verbose", "-v", action="store_true", help="print every answer")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()

    rows = load_rows(args.input, args.rows)
    print(f"cpus={os.cpu_count()} loadavg={os.getloadavg()} rows={len(rows)}", flush=True)
    reports = [run(threads, rows, args) for threads in args.threads]
    print(f"\nloadavg at end={os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
