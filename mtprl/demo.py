"""`mtprl demo`: the main job — `mtprl compare` with a laptop-sized budget (see `mtprl.compare`)."""

from __future__ import annotations

import argparse

from mtprl import compare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    compare.add_arguments(parser, compare.DemoConfig)


def run(args: argparse.Namespace) -> int:
    return compare.run(args, compare.DemoConfig)
