"""`python -m triage report`: one self-contained HTML page about a triaged dataset, for a supervisor.

The page reads the output dataset (and its `_manifest.json`, when the run left one) and shows
the headline numbers, calls by priority x category (a heat-map table and an SVG bar chart),
the calls that need review (possible under-triage first, then urgent calls), the urgent calls,
error counts by reason, tokens and cost, and the manifest.

One module per job, in the order the data flows:

* `data.py` reads the dataset and the manifest into a `Report` (manifest text redacted, secrets masked).
* `aggregation.py` computes the numbers from a `Report` (counts, error kinds, tokens, cost).
* `page.py` renders the HTML (every value escaped, no script, no request) and writes it atomically.

The seam is `Report` (`data.py`): the page is computed from a `Report` alone, so another rendering
(another format, a template engine) replaces `page.py` and nothing else.
"""

from triage.report.aggregation import error_kind, error_kinds, error_parts, priority_by_category, tokens_by_model
from triage.report.data import Manifest, Report, build_report, read_manifest
from triage.report.page import ReportSummary, render_html, write_report

__all__ = [
    "Manifest",
    "Report",
    "ReportSummary",
    "build_report",
    "error_kind",
    "error_kinds",
    "error_parts",
    "priority_by_category",
    "read_manifest",
    "render_html",
    "tokens_by_model",
    "write_report",
]
