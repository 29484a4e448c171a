"""Pre-training of the embedded default on generated solution traces: the loop and its output folder.

Loss (`mtprl.losses.pretrain`): next-token cross-entropy on the solution tokens + w · (mean over
MTP depths of each depth's cross-entropy on the same tokens). w follows DeepSeek-V3's step
schedule: `mtp_weight` (0.3) for the first `mtp_decay_at` (70%) of the steps, then
`mtp_weight_final` (0.1); DeepSeek-V3 switches at 10T of 14.8T tokens (68%). AdamW, linear
warm-up then cosine decay to `min_lr_ratio` of the peak. A share of the traces follows a plausible
shortcut that is right on part of the problems only (see `mtprl.pretrain.data`), so the base
leaves room for RL. Deterministic for a given
seed and thread count.

`pretrain(cfg, out_dir)` writes the checkpoint (`MTPCausalLM` format with its tokenizer),
`pretrain_config.yaml` and, last, `summary.json`; the cache around it is `mtprl.pretrain.cache`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mtprl import __version__
from mtprl.config import config_to_dict, save_config
from mtprl.losses.pretrain import pretrain_loss
from mtprl.model import MTPCausalLM, build_tiny_model, build_tokenizer
from mtprl.pretrain.cache import cache_key, weights_hash
from mtprl.pretrain.config import PretrainConfig
from mtprl.pretrain.data import trace_batches
from mtprl.pretrain.evaluate import evaluate_base
from mtprl.tasks import eval_suites


def mtp_weight_at(step: int, steps: int, weight: float, final: float, decay_at: float) -> float:
    """DeepSeek-V3's step schedule: `weight` before `decay_at · steps`, `final` from then on."""
    return weight if step < decay_at * steps else final


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak LR: linear warm-up over `warmup` steps, then cosine to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


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
                         cfg.shortcut_fraction, cfg.slip_fraction, cfg.suite_seed, cfg.suite_size)
    losses, tokens, smooth, start = [], 0, None, time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="pre-training the base", disable=not cfg.progress, mininterval=1.0,
               dynamic_ncols=True)
    for step in bar:
        batch = next(data)
        lp = model.token_log_probs(batch.input_ids, batch.attention_mask)
        weight = mtp_weight_at(step, cfg.steps, cfg.mtp_weight, cfg.mtp_weight_final, cfg.mtp_decay_at)
        loss, metrics = pretrain_loss(lp.log_probs, lp.mask, lp.mtp_log_probs, lp.mtp_mask, batch.loss_mask, weight)
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
        results = evaluate_base(model, tokenizer, suites, cfg.eval_samples, batch_rows=cfg.eval_batch_size)
        eval_time = time.perf_counter() - eval_start
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, tokenizer=tokenizer)
    save_config(cfg, out_dir / "pretrain_config.yaml")
    summary = {
        "cache_key": cache_key(cfg),
        "weights_hash": weights_hash(out_dir),
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
        "eval_decoding": f"greedy, and {cfg.eval_samples} samples per problem at temperature 1 (mtprl.rollout.generate)",
        "mtprl_version": __version__,
        "config": config_to_dict(cfg),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))  # written last: marks completion
    return summary
