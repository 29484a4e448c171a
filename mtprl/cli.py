"""The `mtprl` command line: one sub-command per entry point, each with its own flat config.

Sub-commands live in their own modules and are imported only when chosen, so `mtprl --help`
stays fast. A command module provides `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mtprl import __version__

# name -> (module, one-line help). The module is imported only when the command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mtprl.demo", "the main job: every MTP regime from the embedded base, side by side, with a report"),
    "compare": ("mtprl.compare", "run chosen regimes x seeds with identical settings, paired comparison, report"),
    "smoke": ("mtprl.model.smoke", "build the tiny default MTP model and run one forward pass"),
    "train": ("mtprl.train.command", "RL from verifiable rewards with an MTP regime (GRPO/DAPO, OCC); writes a run dir"),
    "pretrain": ("mtprl.pretrain.command", "pre-train the embedded default on generated traces (cached per config)"),
    "report": ("mtprl.report.command", "build a report folder (tables, claims, figures) from run directories"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtprl",
        description="RL from verifiable rewards for LMs with multi-token-prediction heads.",
    )
    parser.add_argument("--version", action="version", version=f"mtprl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Only the chosen command's module is imported; it adds its arguments, then we parse fully.
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        sub = argparse.ArgumentParser(prog=f"mtprl {argv[0]}", description=COMMANDS[argv[0]][1])
        module.add_arguments(sub)
        args = sub.parse_args(argv[1:])
        return int(module.run(args) or 0)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
