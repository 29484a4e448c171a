"""`mtprl train`: parse a TrainConfig (YAML + command line), train, print where the run went."""

from __future__ import annotations

import argparse
import json
import os

from mtprl.config import add_config_arguments, load_config
from mtprl.train.config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)
    # `--resume` alone means `--resume auto` (continue from the latest complete checkpoint).
    resume = next(a for a in parser._actions if a.dest == "resume")
    resume.nargs, resume.const = "?", "auto"


def run(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args)  # a ConfigError is printed as one line by mtprl.cli
    from mtprl.train.distributed import shutdown
    from mtprl.train.loop import train

    try:
        run_dir = train(cfg)
    except BaseException:
        shutdown(wait=False)
        raise
    shutdown()
    summary = run_dir / "summary.json"
    if summary.exists() and os.environ.get("RANK", "0") == "0":  # one line per run, not per worker
        final = json.loads(summary.read_text())
        shown = {k: round(v, 4) for k, v in final.get("eval", {}).items() if k.startswith("eval/avg/")}
        print(f"run finished in {final['wall_time']:.1f}s: {run_dir}  {shown}")
    return 0
