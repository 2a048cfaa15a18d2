"""What an optimization run wrote and measured: the one-line summary, `report.md` and `report.json`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage.evaluation import EvaluationReport, Usage, baseline_section, confusion_sections, metric_rows
from triage.metrics import percent

if TYPE_CHECKING:
    from triage.optimize import OptimizeOptions


@dataclass
class OptimizeResult:
    """What a run wrote and measured."""

    files: list[Path]
    before: EvaluationReport
    after: EvaluationReport
    optimizer_usage: dict[str, Usage]
    seconds: float
    options: OptimizeOptions
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        b, a = self.before.scores, self.after.scores
        return (
            f"wrote {', '.join(str(f) for f in self.files)} in {self.seconds:.0f}s; "
            f"{self.options.eval_split} ({self.after.n} calls): "
            f"priority {percent(b.priority_accuracy)} -> {percent(a.priority_accuracy)}, "
            f"category {percent(b.category_accuracy)} -> {percent(a.category_accuracy)}, "
            f"urgent recall {percent(b.urgent_recall)} -> {percent(a.urgent_recall)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.options.optimizer,
            "options": {f.name: getattr(self.options, f.name) for f in fields(self.options)},
            "model": self.after.model,
            "seconds": round(self.seconds, 1),
            "optimizer_usage": {name: vars(u) for name, u in self.optimizer_usage.items()},
            "notes": self.notes,
            "unoptimized": self.before.to_dict(),
            "optimized": self.after.to_dict(),
        }

    def to_markdown(self) -> str:
        o = self.options
        lines = [
            f"# Optimization report: {self.after.model}",
            "",
            f"- Optimizer: `{o.optimizer}`" + (f" ({o.demos} demos per program)" if o.optimizer == "labeled" else ""),
            f"- Train: `{o.train}`" + (f" (first {o.max_train} calls)" if o.max_train else ""),
            f"- Evaluated on: `{self.after.data_file}` ({self.after.n} calls"
            + (f", the first {o.max_eval} of the file)" if o.max_eval else ")"),
            f"- Run: {self.after.created_at}, {self.seconds:.0f} s in total",
            *[f"- {note}" for note in self.notes],
            "",
            "| metric | unoptimized | optimized |",
            "|---|---|---|",
        ]
        rows_after = dict(metric_rows(self.after))
        lines += [f"| {name} | {value} | {rows_after[name]} |" for name, value in metric_rows(self.before)]
        lines += ["", *baseline_section(self.after)]
        lines += [
            "",
            "## Cost of optimizing",
            "",
            "| program | LM calls | prompt tokens | completion tokens |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {u.calls} | {u.prompt_tokens} | {u.completion_tokens} |"
            for name, u in self.optimizer_usage.items()
        ]
        lines += [
            "",
            "Programs: " + "; ".join(f"{name}: {label}" for name, label in self.after.programs.items()),
            "",
            *confusion_sections(self.before.scores, " (unoptimized)"),
            "",
            *confusion_sections(self.after.scores, " (optimized)"),
            "",
        ]
        return "\n".join(lines)
