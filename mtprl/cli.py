"""The `mtprl` command line: one sub-command per entry point, each with its own flat config.

Sub-commands live in their own modules and are imported only when chosen, so `mtprl --help`
and `mtprl COMMAND --help` stay fast (no torch is imported for them). A command module provides
`add_arguments(parser)` and `run(args) -> int`.

Errors: a `UserError` (bad config, data, checkpoint, run directory or argument; see
`mtprl.errors`) is printed as one line, `mtprl COMMAND: error: ...`, with exit status 2; Ctrl-C
prints one line with status 130. `--debug` anywhere on the command line, or `MTPRL_DEBUG=1`,
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from mtprl import __version__
from mtprl.errors import UserError

# name -> (module, one-line help). The module is imported only when the command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mtprl.demo", "the main job: every MTP regime from the embedded base, side by side, with a report"),
    "compare": ("mtprl.compare", "run chosen regimes x seeds with identical settings, paired comparison, report"),
    "smoke": ("mtprl.smoke", "build the tiny default MTP model and run one forward pass"),
    "train": ("mtprl.train.command", "RL from verifiable rewards with an MTP regime (GRPO/DAPO, OCC); writes a run dir"),
    "pretrain": ("mtprl.pretrain.command", "pre-train the embedded default on generated traces (cached per config)"),
    "probe": ("mtprl.probe.command", "finite-difference probe: the true effect of λ on J at a run's checkpoints"),
    "report": ("mtprl.report.command", "build a report folder (tables, claims, figures) from run directories"),
    "acceptance": ("mtprl.integrations.vllm_acceptance", "MTP acceptance of a checkpoint in vLLM beside our engine "
                                                         "(held-out prompts, greedy and T = 1; needs vLLM)"),
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


def debug_requested(argv: list[str]) -> bool:
    """Whether tracebacks are wanted: `--debug` on the command line or MTPRL_DEBUG set to a true value."""
    return "--debug" in argv or os.environ.get("MTPRL_DEBUG", "").lower() not in ("", "0", "false", "no")


def run_command(name: str, argv: list[str], debug: bool) -> int:
    """Parse `argv` for command `name` and run it; a UserError becomes one line on stderr and status 2."""
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"mtprl {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    sub.add_argument("--debug", action="store_true", help="show the traceback of an error (also: MTPRL_DEBUG=1)")
    args = sub.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        if debug:
            raise
        print(f"mtprl {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"mtprl {name}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    if argv[:1] == ["--debug"]:
        argv = argv[1:]
    parser = build_parser()
    # Only the chosen command's module is imported; it adds its arguments, then we parse fully.
    if argv and argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:], debug)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: MTPRL_DEBUG=1)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
