"""Choose the review queue's thresholds from an evaluation report's per-call answers (tune on dev only).

    .venv/bin/python scripts/tune_review.py optimized/report.json      # the optimize run's dev calls
    .venv/bin/python scripts/tune_review.py output/evaluation.json      # any `triage evaluate` report

For every pair (UNDER_TRIAGE_P, DISAGREE_P) on a grid it recomputes the priority reasons from each
call's recorded second opinion (the other reasons, grounding and retries, are kept as recorded) and
prints the share of calls flagged, the wrong priorities flagged and the under-triaged calls
flagged. It suggests the pair that flags the fewest calls while catching every under-triaged call
and at least `--min-catch` of the wrong priorities.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.metrics import is_under_triage  # noqa: E402
from triage.review import DISAGREE_P, UNDER_TRIAGE_P, priority_reasons  # noqa: E402

PRIORITY_REASONS = ("possible under-triage", "priority disagrees")
GRID_UNDER = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 1.01)
GRID_DISAGREE = (0.0, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 1.01)


def calls_of(report: dict) -> list[dict]:
    """The per-call records of an evaluation report, or of an optimize report's optimized run."""
    return report["optimized"]["calls"] if "optimized" in report else report["calls"]


def score(calls: list[dict], under_p: float, disagree_p: float) -> tuple[int, int, int, int, int]:
    """(flagged, wrong priorities, wrong flagged, under-triaged, under-triaged flagged)."""
    flagged = wrong = wrong_flagged = under = under_flagged = 0
    for call in calls:
        answer = call.get("triage") or {}
        priority = answer.get("priority")
        kept = [r for r in (call.get("review") or "").split("; ") if r and not r.startswith(PRIORITY_REASONS)]
        reasons = kept + (
            priority_reasons(priority, call.get("second_opinion") or {}, under_triage_p=under_p, disagree_p=disagree_p)
            if priority
            else []
        )
        flag = bool(reasons)
        flagged += flag
        gold = call["gold"]["priority"]
        if priority and priority != gold:
            wrong += 1
            wrong_flagged += flag
        if is_under_triage(gold, priority):
            under += 1
            under_flagged += flag
    return flagged, wrong, wrong_flagged, under, under_flagged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="an evaluation or optimize report (.json)")
    parser.add_argument("--min-catch", type=float, default=0.7, help="wrong priorities to catch at least [0.7]")
    args = parser.parse_args()
    calls = calls_of(json.loads(Path(args.report).read_text()))
    if not any(call.get("second_opinion") for call in calls):
        print("error: the report's calls carry no second opinion (programs without a labelled pool)")
        return 2
    n = len(calls)
    print(f"{n} calls; in force now: UNDER_TRIAGE_P={UNDER_TRIAGE_P}, DISAGREE_P={DISAGREE_P}")
    print("under_p disagree_p  flagged  wrong caught  under-triaged caught")
    best = None
    for under_p in GRID_UNDER:
        for disagree_p in GRID_DISAGREE:
            flagged, wrong, wrong_flagged, under, under_flagged = score(calls, under_p, disagree_p)
            print(
                f"{under_p:7.2f} {disagree_p:10.2f}  {flagged / n:6.1%}  {wrong_flagged:3d}/{wrong:<3d}      "
                f"{under_flagged:3d}/{under}"
            )
            good = under_flagged == under and wrong_flagged >= args.min_catch * wrong
            if good and (best is None or flagged < best[0]):
                best = (flagged, under_p, disagree_p)
    if best is None:
        print("no pair on the grid meets the aims")
        return 1
    print(f"suggested: UNDER_TRIAGE_P={best[1]}, DISAGREE_P={best[2]} ({best[0] / n:.1%} flagged)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
