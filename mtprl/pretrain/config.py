"""`PretrainConfig`: every setting of `mtprl pretrain`, one flat dataclass, checked before any work."""

from __future__ import annotations

import dataclasses

from mtprl.config import opt, require
from mtprl.tasks import SUITE_SEED, SUITE_SIZE, TASKS

# Fields that do not change the trained weights, left out of the cache key.
NOT_IN_KEY = {"eval_batch_size", "eval_samples", "threads", "cache_dir", "output_dir", "progress"}


@dataclasses.dataclass
class PretrainConfig:
    """Pre-training of the embedded default (NTP + MTP cross-entropy on generated traces)."""

    seed: int = opt(0, "seed of the initial weights and of the training data")
    steps: int = opt(10000, "optimiser steps")
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
    difficulties: list[int] = opt([], "difficulty levels to train on (uniform); empty: each family at its suites' "
                                      "levels")
    shortcut_fraction: float = opt(0.5, "share of traces that follow the family's shortcut (right on part of the "
                                        "problems only); what RL can select away")
    slip_fraction: float = opt(0.0, "share of traces with one wrong step or a wrong final answer (always wrong)")
    suite_seed: int = opt(SUITE_SEED, "seed of the held-out suites (excluded from training, evaluated after)")
    suite_size: int = opt(SUITE_SIZE, "problems per held-out suite")
    eval_samples: int = opt(16, "samples per problem at temperature 1 in the evaluation (pass@1/4/16)")
    eval_batch_size: int = opt(1024, "sequences decoded together in the evaluation")
    threads: int = opt(1, "torch CPU threads; 0: torch's default. One is as fast per core at this model size, "
                          "and two stall each other badly when the cores are shared")
    cache_dir: str | None = opt(None, "cache root; null: $MTPRL_CACHE, else ~/.cache/mtprl")
    output_dir: str | None = opt(None, "also copy the finished checkpoint and summary to this directory")
    progress: bool = opt(True, "show a progress bar")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "num_mtp_layers", "suite_size", "eval_samples", "eval_batch_size"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0 and self.threads >= 0 and self.intermediate_size >= 0,
                "warmup_steps, threads and intermediate_size must be >= 0")
        require(self.mtp_weight >= 0 and self.mtp_weight_final >= 0, "MTP weights must be >= 0")
        require(0 <= self.mtp_decay_at <= 1, f"mtp_decay_at must lie in [0, 1], got {self.mtp_decay_at}")
        require(self.shortcut_fraction >= 0 and self.slip_fraction >= 0
                and self.shortcut_fraction + self.slip_fraction <= 1,
                f"shortcut_fraction ({self.shortcut_fraction}) and slip_fraction ({self.slip_fraction}) must be >= 0 "
                "and sum to at most 1")
        unknown = [f for f in self.families if f not in TASKS]
        require(bool(self.families) and not unknown,
                f"families must be a non-empty list from {sorted(TASKS)}; unknown: {unknown}")
        require(not self.difficulties or min(self.difficulties) >= 1,
                "difficulties must be empty (the suites' levels) or a list of ints >= 1")
        require(self.hidden_size % self.num_heads == 0 and self.num_heads % self.num_kv_heads == 0,
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) and num_heads by "
                f"num_kv_heads ({self.num_kv_heads})")
