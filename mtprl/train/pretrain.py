"""`mtprl pretrain`: pre-train the embedded default on generated solution traces, with caching.

Loss = next-token cross-entropy on the solution tokens + w · (mean over MTP depths of each
depth's cross-entropy on the same tokens). w follows DeepSeek-V3's step schedule: `mtp_weight`
(0.3) for the first `mtp_decay_at` (70%) of the steps, then `mtp_weight_final` (0.1); DeepSeek-V3
switches at 10T of 14.8T tokens (68%). AdamW, linear warm-up then cosine decay to
`min_lr_ratio` of the peak. A share of the traces is deliberately imperfect (see
`pretrain_data`) so the base leaves room for RL. Deterministic for a given seed and thread count.

The defaults (about 1 M parameters, 2800 steps of 16 traces, 20% imperfect) were tuned so the
greedy pass@1 of the base lands between 14% and 79% on every suite (mean 45%) in about six
minutes on one CPU core; `summary.json` records what a run got.

The result (checkpoint in the `MTPCausalLM` format with its tokenizer, `summary.json`,
`pretrain_config.yaml`) is cached under `<root>/base/<key>`: root = `cache_dir`, else $MTPRL_CACHE, else
~/.cache/mtprl; key = hash of every config field that affects the weights. It is written to a
temporary directory and renamed into place only when complete, so an interrupted run never
leaves a directory that looks finished. `ensure_base_model(cfg)` is what other commands call.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mtprl import __version__
from mtprl.config import add_config_arguments, config_to_dict, load_config, opt, require, save_config
from mtprl.model import LogProbs, MTPCausalLM, build_tiny_model, build_tokenizer
from mtprl.tasks import SUITE_SEED, SUITE_SIZE, TASKS, eval_suites
from mtprl.train.pretrain_data import trace_batches
from mtprl.train.pretrain_eval import evaluate_base

FORMAT_VERSION = 1  # bump when the training code or the task generators change what a config produces
# Fields that do not change the trained weights, left out of the cache key.
_NOT_IN_KEY = {"eval_batch_size", "threads", "cache_dir", "out_dir", "progress"}


@dataclasses.dataclass
class PretrainConfig:
    """Pre-training of the embedded default (NTP + MTP cross-entropy on generated traces)."""

    seed: int = opt(0, "seed of the initial weights and of the training data")
    steps: int = opt(2800, "optimiser steps")
    batch_size: int = opt(16, "traces per step (small batches learn more per token at this size)")
    lr: float = opt(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a share of the peak (cosine decay)")
    warmup_steps: int = opt(50, "linear warm-up steps")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0: off")
    hidden_size: int = opt(128, "model width")
    num_layers: int = opt(4, "decoder layers of the trunk")
    num_heads: int = opt(4, "attention heads")
    num_kv_heads: int = opt(2, "key/value heads (grouped-query attention)")
    intermediate_size: int = opt(0, "MLP width; 0: 3 x hidden_size")
    num_mtp_layers: int = opt(1, "MTP depths")
    mtp_weight: float = opt(0.3, "MTP loss weight at the start (DeepSeek-V3: 0.3)")
    mtp_weight_final: float = opt(0.1, "MTP loss weight after mtp_decay_at of the steps (DeepSeek-V3: 0.1)")
    mtp_decay_at: float = opt(0.7, "share of the steps after which the MTP weight drops to mtp_weight_final")
    families: list[str] = opt(["add", "expr", "sort"], "task families to train on")
    difficulties: list[int] = opt([1, 2, 3], "difficulty levels to train on (uniform)")
    imperfect_fraction: float = opt(0.2, "share of traces with a wrong step or a wrong final answer")
    suite_seed: int = opt(SUITE_SEED, "seed of the held-out suites (excluded from training, evaluated after)")
    suite_size: int = opt(SUITE_SIZE, "problems per held-out suite")
    eval_batch_size: int = opt(256, "prompts per greedy-decoding batch in the evaluation")
    threads: int = opt(1, "torch CPU threads; 0: torch's default. One is as fast per core at this model size, "
                          "and two stall each other badly when the cores are shared")
    cache_dir: str | None = opt(None, "cache root; null: $MTPRL_CACHE, else ~/.cache/mtprl")
    out_dir: str | None = opt(None, "also copy the finished checkpoint and summary to this directory")
    progress: bool = opt(True, "show a progress bar")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "num_mtp_layers", "suite_size", "eval_batch_size"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0 and self.threads >= 0 and self.intermediate_size >= 0,
                "warmup_steps, threads and intermediate_size must be >= 0")
        require(self.mtp_weight >= 0 and self.mtp_weight_final >= 0, "MTP weights must be >= 0")
        require(0 <= self.mtp_decay_at <= 1, f"mtp_decay_at must lie in [0, 1], got {self.mtp_decay_at}")
        require(0 <= self.imperfect_fraction <= 1,
                f"imperfect_fraction must lie in [0, 1], got {self.imperfect_fraction}")
        unknown = [f for f in self.families if f not in TASKS]
        require(bool(self.families) and not unknown,
                f"families must be a non-empty list from {sorted(TASKS)}; unknown: {unknown}")
        require(bool(self.difficulties) and min(self.difficulties) >= 1,
                "difficulties must be a non-empty list of ints >= 1")
        require(self.hidden_size % self.num_heads == 0 and self.num_heads % self.num_kv_heads == 0,
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) and num_heads by "
                f"num_kv_heads ({self.num_kv_heads})")


# ----- pure pieces ---------------------------------------------------------------------------------
def pretrain_loss(lp: LogProbs, loss_mask: torch.Tensor, mtp_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """NTP cross-entropy + mtp_weight · mean over depths of the MTP cross-entropy, on `loss_mask` targets.

    lp: `MTPCausalLM.token_log_probs` output ([B, L] main, [K, B, L] MTP); loss_mask [B, L] bool.
    Each term is a mean over its own valid target tokens.
    """
    main_mask = lp.mask & loss_mask  # [B, L]
    main_nll = -(lp.log_probs * main_mask).sum() / main_mask.sum().clamp(min=1)
    depth_masks = lp.mtp_mask & loss_mask.unsqueeze(0)  # [K, B, L]
    depth_nll = -(lp.mtp_log_probs * depth_masks).sum(dim=(1, 2)) / depth_masks.sum(dim=(1, 2)).clamp(min=1)  # [K]
    loss = main_nll + mtp_weight * depth_nll.mean()
    metrics = {"loss": loss.item(), "main_nll": main_nll.item()}
    for k in range(depth_nll.shape[0]):
        metrics[f"mtp{k + 1}_nll"] = depth_nll[k].item()
    return loss, metrics


def mtp_weight_at(step: int, steps: int, weight: float, final: float, decay_at: float) -> float:
    """DeepSeek-V3's step schedule: `weight` before `decay_at · steps`, `final` from then on."""
    return weight if step < decay_at * steps else final


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak LR: linear warm-up over `warmup` steps, then cosine to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----- training ------------------------------------------------------------------------------------
def build_base(cfg: PretrainConfig, tokenizer) -> MTPCausalLM:
    return build_tiny_model(tokenizer, num_mtp_layers=cfg.num_mtp_layers, seed=cfg.seed, hidden_size=cfg.hidden_size,
                            num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                            intermediate_size=cfg.intermediate_size or None)


def train_base(cfg: PretrainConfig) -> tuple[MTPCausalLM, object, dict]:
    """Train a fresh tiny default on `cfg`; returns (model, tokenizer, training stats with loss history)."""
    tokenizer = build_tokenizer()
    model = build_base(cfg, tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))
    data = trace_batches(tokenizer, cfg.seed, cfg.batch_size, cfg.families, cfg.difficulties,
                         cfg.imperfect_fraction, cfg.suite_seed, cfg.suite_size)
    losses, tokens, smooth, start = [], 0, None, time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not cfg.progress, mininterval=1.0, dynamic_ncols=True)
    for step in bar:
        batch = next(data)
        lp = model.token_log_probs(batch.input_ids, batch.attention_mask)
        weight = mtp_weight_at(step, cfg.steps, cfg.mtp_weight, cfg.mtp_weight_final, cfg.mtp_decay_at)
        loss, metrics = pretrain_loss(lp, batch.loss_mask, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(metrics["loss"])
        tokens += batch.num_tokens
        smooth = metrics["loss"] if smooth is None else 0.95 * smooth + 0.05 * metrics["loss"]  # batches vary by family
        bar.set_postfix(loss=f"{smooth:.3f}", mtp=f"{metrics.get('mtp1_nll', 0.0):.3f}",
                        tok_s=f"{tokens / (time.perf_counter() - start):.0f}", refresh=False)
    elapsed = time.perf_counter() - start
    stats = {"train_time_s": elapsed, "tokens": tokens, "tokens_per_s": tokens / max(elapsed, 1e-9),
             "loss_history": losses, "final_metrics": metrics}
    return model.eval(), tokenizer, stats


def loss_curve(losses: list[float], points: int = 50) -> list[list[float]]:
    """[last step of the window, mean loss over the window] for about `points` equal windows."""
    width = max(1, len(losses) // points)
    return [[min(i + width, len(losses)), sum(losses[i: i + width]) / len(losses[i: i + width])]
            for i in range(0, len(losses), width)]


def parameter_counts(model: MTPCausalLM) -> dict[str, int]:
    shared = sum(p.numel() for p in model.shared_parameters())
    mtp = sum(p.numel() for p in model.mtp_parameters())
    return {"shared": shared, "mtp": mtp, "total": shared + mtp}


def pretrain(cfg: PretrainConfig, out_dir: str | Path) -> dict:
    """Train, evaluate on the suites, and write checkpoint + tokenizer + summary.json to `out_dir`."""
    start, cpu_start = time.perf_counter(), time.process_time()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        model, tokenizer, stats = train_base(cfg)
        eval_start = time.perf_counter()
        suites = eval_suites(cfg.suite_seed, cfg.suite_size)
        results = evaluate_base(model, tokenizer, suites, cfg.eval_batch_size)
        eval_time = time.perf_counter() - eval_start
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, tokenizer=tokenizer)
    save_config(cfg, out_dir / "pretrain_config.yaml")
    summary = {
        "cache_key": cache_key(cfg),
        **results,
        "parameters": parameter_counts(model),
        "wall_time_s": time.perf_counter() - start,
        "cpu_time_s": time.process_time() - cpu_start,  # all threads; the honest figure on a busy machine
        "train_time_s": stats["train_time_s"],
        "eval_time_s": eval_time,
        "tokens": stats["tokens"],
        "tokens_per_s": stats["tokens_per_s"],
        "loss_first": stats["loss_history"][0],
        "loss_last": stats["loss_history"][-1],
        "loss_curve": loss_curve(stats["loss_history"]),
        "final_metrics": stats["final_metrics"],
        "threads": threads,
        "eval_decoding": "greedy (mtprl.rollout.generate, temperature 0)",
        "mtprl_version": __version__,
        "config": config_to_dict(cfg),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))  # written last: marks completion
    return summary


# ----- cache ---------------------------------------------------------------------------------------
def cache_key(cfg: PretrainConfig) -> str:
    """16 hex digits from the weight-relevant config fields, the code's format version and mtprl's version."""
    fields = {k: v for k, v in config_to_dict(cfg).items() if k not in _NOT_IN_KEY}
    payload = json.dumps({"fields": fields, "format": FORMAT_VERSION, "mtprl": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_root(cfg: PretrainConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("MTPRL_CACHE") or Path.home() / ".cache" / "mtprl"
    return Path(root).expanduser()


def base_model_dir(cfg: PretrainConfig) -> Path:
    """Where the cached base for `cfg` lives (whether or not it exists yet)."""
    return cache_root(cfg) / "base" / cache_key(cfg)


def is_complete(directory: Path) -> bool:
    return (directory / "summary.json").is_file() and (directory / "config.json").is_file()


def ensure_base_model(cfg: PretrainConfig, force: bool = False) -> Path:
    """The cached base checkpoint for `cfg`, pre-training it first if missing (or if `force`)."""
    target = base_model_dir(cfg)
    if is_complete(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pretrain(cfg, tmp)
        if target.exists():  # forced, or stale or half-written by an older version: replace it
            shutil.rmtree(target)
        os.rename(tmp, target)
    except OSError:
        if not is_complete(target):  # another process did not finish it for us either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_summary(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "summary.json").read_text())


# ----- command line --------------------------------------------------------------------------------
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
    directory = ensure_base_model(cfg, force=args.force)
    if cached:
        print(f"reusing the cached base for this config (key {cache_key(cfg)}); --force trains again")
    print(format_summary(load_summary(directory), directory))
    if cfg.out_dir:
        shutil.copytree(directory, cfg.out_dir, dirs_exist_ok=True)
        print(f"copied to {cfg.out_dir}")
    return 0
