"""Out-of-fold answers on the labelled train + dev calls: more calls than dev's 73 to tune the review queue on.

    .venv/bin/python scripts/out_of_fold.py                        # 4 folds, into output/out_of_fold/
    .venv/bin/python scripts/tune_review.py output/out_of_fold/report.json

The committed programs (`optimized/`) answer each fold's calls with the other folds' calls as their
demo pool: their demos, label bounds, second opinion and neighbours then never hold the call itself.
Each fold is one `triage evaluate` run (the same model and stages as `make evaluate`); the merged
report keeps every call's answers and evidence, and names a JSONL of all the calls as its data file,
which is what `scripts/tune_review.py` reads. The programs' settings (k, bounds) were chosen on dev
with train as the pool, so dev's calls are not perfectly out of sample; the pool is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("triager.json", "detail_extractor.json")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def programs_without(calls: set[str], source: Path, target: Path) -> None:
    """The programs in `source`, saved to `target` with the given calls taken out of their demo pools."""
    target.mkdir(parents=True, exist_ok=True)
    for name in PROGRAMS:
        state = json.loads((source / name).read_text())
        nearest = state["nearest_demos"]
        nearest["pool"] = [entry for entry in nearest["pool"] if entry.get("call_id") not in calls]
        (target / name).write_text(json.dumps(state, ensure_ascii=False, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", nargs="+", default=["data/train.jsonl", "data/dev.jsonl"])
    parser.add_argument("--programs", default="optimized")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--out", default="output/out_of_fold")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calls = [row for path in args.labelled for row in read_jsonl(Path(path))]
    write_jsonl(out / "calls.jsonl", calls)
    merged: list[dict] = []
    for fold in range(args.folds):
        fold_calls = calls[fold :: args.folds]
        fold_dir = out / f"fold-{fold}"
        programs_without({row["call_id"] for row in fold_calls}, Path(args.programs), fold_dir / "programs")
        write_jsonl(fold_dir / "calls.jsonl", fold_calls)
        command = [
            sys.executable, "-m", "triage", "evaluate", "--input", str(fold_dir / "calls.jsonl"),
            "--optimized-dir", str(fold_dir / "programs"), "--report", str(fold_dir / "evaluation"),
        ]  # fmt: skip
        print(f"fold {fold + 1}/{args.folds}: {len(fold_calls)} calls", flush=True)
        subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "TRIAGE_CACHE": "false"})
        merged += json.loads((fold_dir / "evaluation.json").read_text())["calls"]
    report = {"data_file": str(out / "calls.jsonl"), "folds": args.folds, "calls": merged}
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1))
    wrong = sum(1 for c in merged if (c.get("triage") or {}).get("priority") != c["gold"]["priority"])
    print(f"{len(merged)} calls, {wrong} wrong priorities -> {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
