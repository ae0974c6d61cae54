"""Reports of many runs: tables, significance tests, figures, as Markdown, HTML and a tidy CSV.

``build_report(["runs/"], "report/")`` (what ``cbstore report runs/ --out report/`` calls) reads
complete run folders and writes ``report.md``, ``report.html`` (self-contained), ``figures/``
(PNG and SVG) and ``results.csv`` (one row per run x metric, every setting a column).
"""

from fusion.reporting.build import ReportOptions, build_report
from fusion.reporting.collect import ReportInputError, RunRecord, load_runs, results_frame

__all__ = ["ReportInputError", "ReportOptions", "RunRecord", "build_report", "load_runs",
           "results_frame"]
