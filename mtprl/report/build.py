"""Write the report folder: report.md, the PNG figures and summary.json, from run directories only.

All run directories are read and checked, and the output folder vetted, before anything is
written: a bad input leaves the disk untouched. The output folder may already exist (its report
files are overwritten); it may not be one of the run directories, whose summary.json it would
replace.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mtprl.report.base import attach_base, load_base
from mtprl.report.figures import write_figures
from mtprl.report.load import ReportError, Run, load_runs
from mtprl.report.markdown import render_report
from mtprl.report.summary import group_runs, summarize


def _check_out_dir(out_dir: Path, runs: list[Run]) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"output folder '{out_dir}' exists and is not a folder; choose a folder path")
    target = out_dir.resolve()
    for run in runs:
        if Path(run.path).resolve() == target:
            raise ReportError(f"output folder '{out_dir}' is the run directory '{run.path}'; writing the report there "
                              "would overwrite its summary.json, so choose another folder")


def build_report(run_dirs: Iterable[str | Path], out_dir: str | Path,
                 base_dir: str | Path | None = None) -> dict[str, Any]:
    """Read the runs (and the shared base evaluation in `base_dir`, written by `mtprl compare`), write
    out_dir/{report.md, summary.json, *.png}; return the summary dict."""
    runs = load_runs(run_dirs)
    base = load_base(base_dir) if base_dir is not None else None
    out = Path(out_dir)
    _check_out_dir(out, runs)
    if base is not None:
        attach_base(runs, base)
    summary = summarize(runs, base)
    out.mkdir(parents=True, exist_ok=True)
    summary["figures"] = write_figures(group_runs(runs), summary, out)
    (out / "report.md").write_text(render_report(summary))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary
