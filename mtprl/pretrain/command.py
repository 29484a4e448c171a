"""`mtprl pretrain`: pre-train (or find in the cache) the embedded base and print its evaluation."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mtprl.config import add_config_arguments, load_config
from mtprl.pretrain.cache import base_model_dir, cache_key, ensure_base_model, is_complete, load_summary
from mtprl.pretrain.config import PretrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PretrainConfig)
    parser.add_argument("--force", action="store_true", help="pre-train again even if a cached base exists")


def format_summary(summary: dict, directory: Path) -> str:
    lines = [f"{'suite':<12} pass@1"]
    lines += [f"{name:<12} {value:6.1%}" for name, value in summary["pass_at_1"].items()]
    lines.append(f"{'mean':<12} {summary['pass_at_1_mean']:6.1%}")
    agreement = ", ".join(f"{a:.1%}" for a in summary["mtp_top1_agreement"])
    params = summary["parameters"]
    lines.append(f"MTP teacher-forced top-1 agreement per depth: {agreement}")
    lines.append(f"parameters: {params['shared']:,} shared + {params['mtp']:,} MTP; loss {summary['loss_first']:.3f} "
                 f"-> {summary['loss_last']:.3f}; {summary['tokens_per_s']:.0f} tokens/s on {summary['threads']} "
                 f"thread(s); wall time {summary['wall_time_s']:.0f}s (eval {summary['eval_time_s']:.0f}s), "
                 f"CPU time {summary['cpu_time_s']:.0f}s")
    lines.append(f"checkpoint: {directory}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args)
    cached = is_complete(base_model_dir(cfg)) and not args.force
    directory = ensure_base_model(cfg, force=args.force, announce=False)
    if cached:
        print(f"reusing the cached base for this config (key {cache_key(cfg)}); --force trains again")
    print(format_summary(load_summary(directory), directory))
    if cfg.output_dir:
        shutil.copytree(directory, cfg.output_dir, dirs_exist_ok=True)
        print(f"copied to {cfg.output_dir}")
    return 0
