"""Reports from run directories: tables, paired comparisons, the paper's claims and figures.

Reads only files a run wrote (config.yaml, metrics.jsonl, summary.json); imports no trainer code.
  build_report(run_dirs, out_dir) -> summary dict   writes report.md, summary.json and PNG figures
  summarize(runs) -> summary dict                    the same numbers, nothing written
  format_summary_table(summary) -> str               the regime × suite table for a terminal
  load_runs(run_dirs) -> list[Run]                    read and check run directories
"""

from mtprl.report.build import build_report
from mtprl.report.load import ReportError, Run, load_run, load_runs
from mtprl.report.summary import summarize
from mtprl.report.tables import format_summary_table

__all__ = ["ReportError", "Run", "build_report", "format_summary_table", "load_run", "load_runs", "summarize"]
