"""`mtprl report RUN_DIR... [--output-dir DIR] [--config FILE]`: build the report folder and print the table.

The run directories come from the command line (positional) or the config's `run_dirs`. Without
`--output-dir` the report goes to `report/` in the run directories' common parent folder, beside
the runs (for runs under the git-ignored `runs/`, inside it), never into the current directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from mtprl.config import ConfigError, add_config_arguments, load_config, opt


@dataclasses.dataclass
class ReportConfig:
    """Build a report folder (report.md, summary.json, PNG figures) from run directories."""

    run_dirs: list[str] = opt([], "run directories (each with metrics.jsonl, config.yaml, and summary.json once "
                                  "finished); RUN_DIR arguments on the command line win")
    output_dir: str | None = opt(None, "folder for report.md, summary.json and the figures; null: 'report' in "
                                       "the run directories' common parent folder")


def default_output_dir(run_dirs: list[str]) -> Path:
    """`report/` in the common parent folder of the run directories."""
    parents = [os.path.dirname(os.path.abspath(d)) for d in run_dirs]
    return Path(os.path.commonpath(parents)) / "report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("positional_run_dirs", nargs="*", metavar="RUN_DIR", help="run directories to report on")
    add_config_arguments(parser, ReportConfig)


def run(args: argparse.Namespace) -> int:
    from mtprl.report.build import build_report
    from mtprl.report.tables import format_summary_table

    overrides = {"run_dirs": args.positional_run_dirs} if args.positional_run_dirs else {}
    cfg = load_config(ReportConfig, args, **overrides)
    if not cfg.run_dirs:
        raise ConfigError("no run directories given; pass them as RUN_DIR arguments or as run_dirs in --config")
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.run_dirs)
    summary = build_report(cfg.run_dirs, out)  # a ReportError is printed as one line by mtprl.cli
    print(format_summary_table(summary))
    print()
    for claim in summary["claims"]:
        print(f"claim ({claim['id']}) {claim['claim']}: {claim['verdict']}")
    skipped = [f["file"] for f in summary["figures"] if not f["written"]]
    skipped_text = f" (figures skipped: {', '.join(skipped)})" if skipped else ""
    print(f"\nreport written to {out / 'report.md'}{skipped_text}")
    return 0
