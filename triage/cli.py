"""`python -m triage run`: flags into Settings, one library call, a one-line summary."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from triage.errors import TriageError, redact
from triage.settings import resolve_settings, setting_help

RUN_FLAGS = ("input", "output", "model", "api_base", "optimized_dir", "concurrency", "limit", "rpm", "tpm")
FLAG_TYPES = {"concurrency": int, "limit": int, "rpm": float, "tpm": float}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m triage", description="Triage 911-call transcripts with DSPy.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="triage transcripts into a Parquet dataset",
        description="Each flag can also be set as an environment variable or in .env.",
    )
    helps = {name: (env, text, default) for name, env, text, default in setting_help()}
    for name in RUN_FLAGS:
        env, text, default = helps[name]
        kind = FLAG_TYPES.get(name, str)
        run.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            default=None,
            help=f"{text} [{env}; default: {default}]",
        )
    run.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="start the output afresh instead of resuming it [TRIAGE_OVERWRITE]",
    )
    run.add_argument("--verbose", action="store_true", help="show Ray's and DSPy's own logs")
    report = commands.add_parser(
        "report",
        help="write a self-contained HTML report of a triaged dataset",
        description="One HTML page for a supervisor: no script, no network, charts inline.",
    )
    report.add_argument("--input", default="output/triaged_calls/", help="the triaged dataset [default: %(default)s]")
    report.add_argument("--output", default="output/report.html", help="the HTML file to write [default: %(default)s]")
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
    _configure_logging(args.verbose)
    secrets: list[str] = []
    try:
        settings = resolve_settings({name: getattr(args, name) for name in (*RUN_FLAGS, "overwrite")})
        if settings.api_key is not None:
            secrets.append(settings.api_key.reveal())
        from triage.pipeline import run

        summary = run(settings, verbose=args.verbose)
    except TriageError as exc:
        print(f"error: {redact(str(exc), secrets)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(summary.line())
    return 0
