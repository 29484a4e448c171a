"""Reports from run directories: tables, paired comparisons, the paper's claims and figures.

Reads only files a run wrote (config.yaml, metrics.jsonl, summary.json); imports no trainer code.
  build_report(run_dirs, out_dir) -> summary dict   writes report.md, summary.json and PNG figures
  summarize(runs) -> summary dict                    the same numbers, nothing written
  format_summary_table(summary) -> str               the regime × suite table for a terminal
  load_runs(run_dirs) -> list[Run]                    read and check run directories
The names are imported on first use, so `mtprl report --help` does not import matplotlib.
"""

from mtprl._lazy import lazy_exports

_LAZY = {"build_report": "mtprl.report.build", "ReportError": "mtprl.report.load", "Run": "mtprl.report.load",
         "load_run": "mtprl.report.load", "load_runs": "mtprl.report.load", "summarize": "mtprl.report.summary",
         "format_summary_table": "mtprl.report.tables"}
__all__ = ["ReportError", "Run", "build_report", "format_summary_table", "load_run", "load_runs", "summarize"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
