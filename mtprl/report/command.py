"""`mtprl report RUN_DIR... [--out DIR]`: build the report folder from run directories and print the table."""

from __future__ import annotations

import argparse
import sys

from mtprl.report.build import build_report
from mtprl.report.load import ReportError
from mtprl.report.tables import format_summary_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (each with metrics.jsonl, config.yaml, and summary.json once finished)")
    parser.add_argument("--out", default="report", metavar="DIR",
                        help="folder for report.md, summary.json and the figures [default: ./report]")


def run(args: argparse.Namespace) -> int:
    try:
        summary = build_report(args.run_dirs, args.out)
    except ReportError as err:
        print(f"mtprl report: error: {err}", file=sys.stderr)
        return 2
    print(format_summary_table(summary))
    print()
    for claim in summary["claims"]:
        print(f"claim ({claim['id']}) {claim['claim']}: {claim['verdict']}")
    skipped = [f["file"] for f in summary["figures"] if not f["written"]]
    skipped_text = f" (figures skipped: {', '.join(skipped)})" if skipped else ""
    print(f"\nreport written to {args.out}/report.md{skipped_text}")
    return 0
