"""`python -m triage run`: flags into Settings, one library call, a one-line summary."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import get_args

from triage.errors import TriageError, redact
from triage.settings import ENV_PREFIX, Settings, resolve_settings

RUN_FLAGS = (
    "input",
    "output",
    "model",
    "api_base",
    "optimized_dir",
    "concurrency",
    "limit",
    "rpm",
    "tpm",
    "max_cost",
    "demos",
    "overwrite",
    "batch",
    "no_wait",
    "batch_retry",
)
METAVARS = {int: "N", float: "X", str: "TEXT"}


def add_setting_flags(
    parser: argparse.ArgumentParser, names: Sequence[str], renamed: Mapping[str, str] | None = None
) -> None:
    """One flag per Settings field named, its help and value type taken from the field itself.

    Values stay text here: Settings validates and converts them, so a bad flag, variable or `.env`
    line gives the same one-line error. A flag left out is None: "not given", the next source decides.
    """
    for name in names:
        field = Settings.model_fields[name]
        flag = (renamed or {}).get(name, name.replace("_", "-"))
        kind = next(kind for kind in (field.annotation, *get_args(field.annotation)) if kind in (bool, *METAVARS))
        text = f"{field.description} [{ENV_PREFIX}{name.upper()}; default: {field.default}]"
        if kind is bool:
            parser.add_argument(f"--{flag}", dest=name, action="store_true", default=None, help=text)
        else:
            parser.add_argument(f"--{flag}", dest=name, default=None, metavar=METAVARS[kind], help=text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m triage", description="Triage 911-call transcripts with DSPy.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="triage transcripts into a Parquet dataset",
        description="Each flag can also be set as an environment variable or in .env.",
    )
    add_setting_flags(run, RUN_FLAGS)
    run.add_argument("--verbose", action="store_true", help="show Ray's and DSPy's own logs")
    report = commands.add_parser(
        "report",
        help="write a self-contained HTML report of a triaged dataset",
        description="One HTML page for a supervisor: no script, no network, charts inline.",
    )
    report.add_argument("--input", default="output/triaged_calls/", help="the triaged dataset [default: %(default)s]")
    report.add_argument("--output", default="output/report.html", help="the HTML file to write [default: %(default)s]")
    _add_evaluate_and_optimize(commands)
    return parser


def _report(args: argparse.Namespace) -> int:
    from triage.report import write_report

    try:
        summary = write_report(args.input, args.output)
    except TriageError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not verbose:
        for noisy in ("ray", "dspy", "LiteLLM", "litellm", "httpx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args)
    if args.command in SETTING_FLAGS:
        return _with_settings(args, SETTING_FLAGS[args.command], _evaluate if args.command == "evaluate" else _optimize)
    return _with_settings(args, RUN_FLAGS, _run)


# A run that stopped at --max-cost with rows left: its output holds what was done.
EXIT_STOPPED_AT_CEILING = 3


def _run(settings: Settings, args: argparse.Namespace) -> tuple[str, int]:
    from triage.native_stderr import without_ray_false_alarm
    from triage.pipeline import run, stop_ray

    with without_ray_false_alarm():
        try:
            summary = run(settings, verbose=args.verbose)
        finally:
            stop_ray()
    return summary.line(), EXIT_STOPPED_AT_CEILING if summary.left_at_ceiling else 0


def _with_settings(
    args: argparse.Namespace,
    flags: Sequence[str],
    command: Callable[[Settings, argparse.Namespace], str | tuple[str, int]],
) -> int:
    """Resolve the settings, run one library call, print its one-line summary; a TriageError is one line, exit 2.

    A command may return (line, exit code) instead of its line alone (exit 0).
    """
    _configure_logging(args.verbose)
    secrets: list[str] = []
    try:
        settings = resolve_settings({name: getattr(args, name) for name in flags})
        if settings.api_key is not None:
            secrets.append(settings.api_key.get_secret_value())
        line = command(settings, args)
    except TriageError as exc:
        print(f"error: {redact(str(exc), secrets)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    line, code = line if isinstance(line, tuple) else (line, 0)
    print(line)
    return code


# ─── evaluate / optimize ─────────────────────────────────────────────────────────────────────────

SETTING_FLAGS = {
    "evaluate": ("model", "api_base", "optimized_dir", "concurrency", "limit"),
    "optimize": ("model", "api_base", "optimized_dir", "concurrency", "reflection_model"),
}


def _add_evaluate_and_optimize(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="score both programs on a labeled file: accuracy, urgent recall, confusion matrices",
        description="Runs the pipeline's stages over a labeled JSONL file and writes a Markdown + JSON report.",
    )
    evaluate.add_argument(
        "--input",
        dest="labeled",
        required=True,
        help="labeled JSONL (transcript, priority, category, location, subject_description)",
    )
    add_setting_flags(evaluate, SETTING_FLAGS["evaluate"])
    evaluate.add_argument(
        "--report", default="output/evaluation", help="writes REPORT.md and REPORT.json [default: %(default)s]"
    )
    evaluate.add_argument("--verbose", action="store_true", help="show DSPy's own logs")

    optimize = commands.add_parser(
        "optimize",
        help="compile both programs on the train split and report before/after on dev",
        description="Saves OUTPUT_DIR/triager.json, detail_extractor.json and report.{md,json} atomically.",
    )
    optimize.add_argument(
        "--optimizer",
        default="nearest",
        help="nearest (default: each call's most similar labelled calls as demos), labeled (fixed demos, no LM "
        "calls), bootstrap, mipro (needs dspy[optuna]) or gepa (needs --reflection-model)",
    )
    optimize.add_argument("--train", default="data/train.jsonl", help="labeled calls to learn from [%(default)s]")
    optimize.add_argument("--dev", default="data/dev.jsonl", help="labeled calls for the report [%(default)s]")
    optimize.add_argument("--test", default="data/test.jsonl", help="used instead of --dev with --eval-split test")
    optimize.add_argument("--eval-split", default="dev", help="dev or test [%(default)s]")
    optimize.add_argument("--max-train", type=int, default=None, help="use only the first N train calls")
    optimize.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N calls only")
    optimize.add_argument("--demos", type=int, default=6, help="labeled and searching optimizers: demos [%(default)s]")
    optimize.add_argument(
        "--k", type=int, nargs="+", default=[1, 2], help="nearest: demos per call to try on the eval split [1 2]"
    )
    optimize.add_argument(
        "--choices",
        type=int,
        nargs="+",
        default=[5],
        help="nearest: the triager's labels may be bounded by those of its N nearest calls; "
        "each N is tried on the eval split against no bound (0 alone: never bound) [5]",
    )
    optimize.add_argument(
        "--max-demo-chars", type=int, default=300, help="nearest: demo transcripts are cut to this [%(default)s]"
    )
    add_setting_flags(optimize, SETTING_FLAGS["optimize"], {"optimized_dir": "output-dir"})
    optimize.add_argument("--verbose", action="store_true", help="show DSPy's own logs")


def _evaluate(settings: Settings, args: argparse.Namespace) -> str:
    from triage.evaluation import evaluate

    report = evaluate(settings, args.labeled, limit=settings.limit)
    markdown, data = report.write(args.report)
    return f"{report.line()} -> {markdown}, {data}"


def _optimize(settings: Settings, args: argparse.Namespace) -> str:
    from triage.optimize import OptimizeOptions, optimize

    options = OptimizeOptions(
        optimizer=args.optimizer,
        train=args.train,
        dev=args.dev,
        test=args.test,
        eval_split=args.eval_split,
        max_train=args.max_train,
        max_eval=args.max_eval,
        demos=args.demos,
        k_candidates=tuple(args.k),
        choices_candidates=tuple(args.choices),
        max_demo_chars=args.max_demo_chars,
    )
    return optimize(settings, options).line()
