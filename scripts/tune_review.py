"""Choose the review queue's thresholds from an evaluation report's per-call answers (tune on dev only).

    .venv/bin/python scripts/tune_review.py optimized/report.json      # the optimize run's dev calls
    .venv/bin/python scripts/tune_review.py output/evaluation.json      # any `triage evaluate` report

For every (UNDER_TRIAGE_P, DISAGREE_P, MIN_SUPPORT, READER_P) on a grid it recomputes the priority
reasons from each call's recorded second opinion, neighbours' shares and second reader, and the caller's-words reasons
(`triage.cues`) from the transcripts in the report's data file (the other reasons, grounding,
retries and "urgent was one of the labelled calls' choices", are kept as recorded) and counts the
calls flagged, the wrong priorities flagged and the under-triaged calls flagged. It prints the grid
around the values in force and suggests the triple that flags the fewest calls while catching every
under-triaged call and at least `--min-catch` of the wrong priorities. (MIN_SUPPORT 0 turns the
neighbours' rule off, READER_P 1.01 the second reader's; `--no-cues` the caller's words.)
`--frontier` prints instead, for each share of calls flagged, the most wrong priorities any grid
point catches within it: how much a larger queue would buy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.evaluation import load_labeled  # noqa: E402
from triage.metrics import is_under_triage  # noqa: E402
from triage.review import (  # noqa: E402
    DISAGREE_P,
    MIN_SUPPORT,
    READER_P,
    UNDER_TRIAGE_P,
    URGENT_WAS_A_CHOICE,
    cue_reasons,
    priority_reasons,
    reader_reasons,
)

PRIORITY_REASONS = ("possible under-triage", "possible over-triage", "priority disagrees", "priority weakly backed")
GRID_UNDER = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 1.01)
GRID_DISAGREE = (0.0, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 1.01)
GRID_SUPPORT = (0.0, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
GRID_READER = (0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 1.01)


def calls_of(report: dict) -> list[dict]:
    """The per-call records of an evaluation report, or of an optimize report's optimized run."""
    return report["optimized"]["calls"] if "optimized" in report else report["calls"]


def with_transcripts(calls: list[dict], report: dict) -> list[dict]:
    """The calls, each with its transcript read from the report's data file (by call_id)."""
    run = report.get("optimized", report)
    transcripts = {example.call_id: example.transcript for example in load_labeled(run["data_file"])}
    return [{**call, "transcript": transcripts[call["call_id"]]} for call in calls]


def with_fixed_reasons(calls: list[dict]) -> list[dict]:
    """The calls, each with the reasons no threshold changes (`fixed`): the recorded ones other than
    the priority's, and the caller's words' (from the transcript, when the call carries it)."""
    prepared = []
    for call in calls:
        priority = (call.get("triage") or {}).get("priority")
        recorded = (call.get("review") or "").split("; ")
        fixed = [r for r in recorded if r and (URGENT_WAS_A_CHOICE in r or not r.startswith(PRIORITY_REASONS))]
        if priority and "transcript" in call:
            fixed += cue_reasons(priority, call["transcript"])
        prepared.append({**call, "fixed": fixed})
    return prepared


def score(calls: list[dict], under_p: float, disagree_p: float, min_support: float, reader_p: float) -> tuple[int, ...]:
    """(flagged, wrong priorities, wrong flagged, under-triaged, under-triaged flagged), for calls
    from `with_fixed_reasons`."""
    flagged = wrong = wrong_flagged = under = under_flagged = 0
    for call in calls:
        priority = (call.get("triage") or {}).get("priority")
        flag = bool(call["fixed"])
        if priority and not flag:
            opinion, neighbours = call.get("second_opinion") or {}, call.get("neighbours") or {}
            flag = bool(
                priority_reasons(
                    priority,
                    opinion,
                    neighbours,
                    under_triage_p=under_p,
                    disagree_p=disagree_p,
                    min_support=min_support,
                )
                or reader_reasons(priority, call.get("second_reader") or {}, min_p=reader_p)
            )
        flagged += flag
        gold = call["gold"]["priority"]
        if priority and priority != gold:
            wrong += 1
            wrong_flagged += flag
        if is_under_triage(gold, priority):
            under += 1
            under_flagged += flag
    return flagged, wrong, wrong_flagged, under, under_flagged


THRESHOLDS = "under_p disagree_p min_support reader_p"
HEADER = f"{THRESHOLDS}  flagged  wrong caught  under-triaged caught"


def row(calls: list[dict], *thresholds: float) -> str:
    flagged, wrong, wrong_flagged, under, under_flagged = score(calls, *thresholds)
    under_p, disagree_p, min_support, reader_p = thresholds
    return (
        f"{under_p:7.2f} {disagree_p:10.2f} {min_support:11.2f} {reader_p:8.2f}  {flagged / len(calls):6.1%}  "
        f"{wrong_flagged:3d}/{wrong:<3d}      {under_flagged:3d}/{under}"
    )


def scored_grid(calls: list[dict]) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """(`score`, thresholds) for every point of the thresholds' grid."""
    return [
        (score(calls, *thresholds), thresholds)
        for thresholds in itertools.product(GRID_UNDER, GRID_DISAGREE, GRID_SUPPORT, GRID_READER)
    ]


FRONTIER_SHARES = (0.125, 0.15, 0.175, 0.2, 0.225, 0.25, 0.3, 0.4)


def frontier(
    calls: list[dict], shares: tuple[float, ...] = FRONTIER_SHARES
) -> list[tuple[float, tuple[int, ...], tuple[float, ...]]]:
    """For each share of calls flagged at most, the grid point catching the most wrong priorities
    (then the most under-triaged calls, then flagging the fewest): (share, `score`, thresholds)."""
    scored = scored_grid(calls)
    best = []
    for share in shares:
        within = [(s, t) for s, t in scored if s[0] <= share * len(calls)]
        if within:
            s, t = max(within, key=lambda item: (item[0][2], item[0][4], -item[0][0]))
            best.append((share, s, t))
    return best


def print_frontier(calls: list[dict]) -> None:
    print(f"{len(calls)} calls; at most  flagged  wrong caught  under-triaged caught  {THRESHOLDS}")
    for share, (flagged, wrong, wrong_flagged, under, under_flagged), thresholds in frontier(calls):
        caught = f"{wrong_flagged:3d}/{wrong:<3d}      {under_flagged:3d}/{under:<3d}"
        print(f"{share:>16.1%}   {flagged / len(calls):6.1%}  {caught}               {thresholds}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="an evaluation or optimize report (.json)")
    parser.add_argument("--min-catch", type=float, default=0.7, help="wrong priorities to catch at least [0.7]")
    parser.add_argument("--no-cues", action="store_true", help="leave out the caller's-words reasons")
    parser.add_argument("--frontier", action="store_true", help="the most caught within each share flagged")
    args = parser.parse_args()
    report = json.loads(Path(args.report).read_text())
    calls = calls_of(report) if args.no_cues else with_transcripts(calls_of(report), report)
    if not any(call.get("second_opinion") or call.get("neighbours") for call in calls):
        print("error: the report's calls carry no second opinion (programs without a labelled pool)")
        return 2
    calls = with_fixed_reasons(calls)
    if args.frontier:
        print_frontier(calls)
        return 0
    in_force = (UNDER_TRIAGE_P, DISAGREE_P, MIN_SUPPORT, READER_P)
    print(
        f"{len(calls)} calls; in force: UNDER_TRIAGE_P={UNDER_TRIAGE_P}, DISAGREE_P={DISAGREE_P}, "
        f"MIN_SUPPORT={MIN_SUPPORT}, READER_P={READER_P}"
    )
    print(HEADER)
    for under_p, disagree_p in itertools.product(GRID_UNDER, GRID_DISAGREE):
        print(row(calls, under_p, disagree_p, MIN_SUPPORT, READER_P))
    print(HEADER)
    for min_support, reader_p in itertools.product(GRID_SUPPORT, GRID_READER):
        print(row(calls, UNDER_TRIAGE_P, DISAGREE_P, min_support, reader_p))
    best = None
    for (flagged, wrong, wrong_flagged, under, under_flagged), thresholds in scored_grid(calls):
        good = under_flagged == under and wrong_flagged >= args.min_catch * wrong
        if good and (best is None or flagged < best[0]):
            best = (flagged, *thresholds)
    if best is None:
        print("nothing on the grid meets the aims")
        return 1
    print(
        f"suggested: UNDER_TRIAGE_P={best[1]}, DISAGREE_P={best[2]}, MIN_SUPPORT={best[3]}, READER_P={best[4]} "
        f"({best[0] / len(calls):.1%} flagged; in force: {score(calls, *in_force)[0] / len(calls):.1%})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
