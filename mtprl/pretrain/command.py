"""`mtprl pretrain`: pre-train (or find in the cache) the embedded base and print its evaluation."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mtprl.config import add_config_arguments, load_config
from mtprl.pretrain.cache import (SHIPPED_DIR, base_model_dir, cache_key, ensure_base_model, is_complete,
                                  load_summary, shipped_base)
from mtprl.pretrain.config import PretrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PretrainConfig)
    parser.add_argument("--force", action="store_true", help="pre-train again even if a cached base exists")


def _cell(result: dict, metric: str) -> str:
    return f"{result[metric]:6.1%} ± {result[metric + '_se']:.1%}" if metric in result else "—"


def format_summary(summary: dict, directory: Path) -> str:
    """The base's evaluation table (per suite and mean, each with its standard error) and its vital numbers."""
    suites, mean = summary["suites"], summary["mean"]
    metrics = [m for m in ("greedy", "pass@1", "pass@4", "pass@16") if m in mean]
    first = next(iter(suites.values()))
    lines = [f"held-out suites ({first['problems']} problems each; pass@k from {first['samples']} samples at T = "
             f"{first['temperature']:g}; ± standard error over problems)",
             f"{'suite':<10} " + " ".join(f"{m:>15}" for m in metrics) + "  shortcut share"]
    for name, result in suites.items():
        share = "—" if result["shortcut_share"] is None else f"{result['shortcut_share']:.1%}"
        lines.append(f"{name:<10} " + " ".join(f"{_cell(result, m):>15}" for m in metrics) + f"  {share:>14}")
    lines.append(f"{'mean':<10} " + " ".join(f"{_cell(mean, m):>15}" for m in metrics))
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
    shipped = None if args.force else shipped_base(cfg)
    cached = shipped is None and is_complete(base_model_dir(cfg)) and not args.force
    directory = ensure_base_model(cfg, force=args.force, announce=False)
    summary = load_summary(directory)
    if shipped is not None:
        print(f"using the shipped base for this config ({directory}); --force pre-trains it again into the cache")
    elif cached:
        print(f"reusing the cached base for this config (key {cache_key(cfg)}); --force trains again")
    print(format_summary(summary, directory))
    print(f"weights hash: {summary['weights_hash']}")
    reference = SHIPPED_DIR if directory != SHIPPED_DIR and is_complete(SHIPPED_DIR) else None
    if reference is not None and load_summary(reference).get("cache_key") == summary.get("cache_key"):
        theirs = load_summary(reference)["weights_hash"]
        same = "identical to" if theirs == summary["weights_hash"] else "different from"
        print(f"{same} the shipped base ({theirs}); pre-training is deterministic for a seed and thread count on one "
              "machine, not bit for bit across machines")
    if cfg.output_dir:
        shutil.copytree(directory, cfg.output_dir, dirs_exist_ok=True)
        print(f"copied to {cfg.output_dir}")
    return 0
