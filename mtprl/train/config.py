"""`TrainConfig`: every setting of `mtprl train`, one flat dataclass, checked before any model is built.

Load it with `mtprl.config.load_config(TrainConfig, args)` (defaults < YAML < command line) or
build it in code and pass it to `mtprl.train.train`, which checks it again the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Literal

from mtprl.config import ConfigError, build_config, config_to_dict, opt, require

# The regimes built into mtprl.losses and its default dual-clip constant, written out so that this
# module imports no torch (`mtprl train --help` answers at once); tests/test_train_config.py checks
# them against mtprl.losses. Validation looks names up in the registry itself (MTP_REGIMES).
BUILT_IN_REGIMES = ("frozen", "detach", "detach-mtp-only", "ce", "policy", "occ", "occ-exact")
DEFAULT_DUAL_CLIP = 10.0

TINY_DEFAULT = "tiny-default"
_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


@dataclasses.dataclass
class TrainConfig:
    """RL from verifiable rewards (GRPO/DAPO) with an MTP regime: rollouts, rewards, mini-batch updates."""

    # ----- model and data ------------------------------------------------------------------------
    model: str = opt(TINY_DEFAULT, "'tiny-default' (the embedded model, pre-trained and cached on first use) or a "
                                   "local Hugging Face checkpoint directory, with or without MTP weights")
    num_mtp_layers: int | None = opt(None, "MTP layers to train; null: as many as the checkpoint has (at least 1); "
                                           "missing ones start fresh")
    data: str | None = opt(None, "local math data (.jsonl / .parquet / datasets dir) trained as a MathTask; "
                                 "null: the generated task families")
    data_problem_key: str = opt("problem", "column of --data holding the problem text")
    data_answer_key: str = opt("answer", "column of --data holding the reference answer")
    eval_data: list[str] = opt([], "held-out math data files for evaluation with --data, one suite per file "
                                   "(named by the file's stem)")
    families: list[str] = opt(["add", "expr", "sort"], "generated task families to train on (without --data)")
    eval_suites: list[str] = opt([], "held-out suites to evaluate (without --data); empty: all six")
    chat_template: bool = opt(False, "wrap each prompt in the tokenizer's chat template (instruct checkpoints)")
    max_prompt_tokens: int = opt(512, "longer prompts keep their last this many tokens")

    # ----- MTP regime ----------------------------------------------------------------------------
    regime: str = opt("occ", "how the MTP heads train during RL: a regime of mtprl.losses.MTP_REGIMES; built in: "
                             + ", ".join(BUILT_IN_REGIMES))
    mtp_coef: float = opt(0.1, "λ₀, the base MTP loss coefficient (split over the K heads; OCC scales it by ĉ)")
    occ_estimator: Literal["mean-ratio", "ratio-of-sums"] = opt("mean-ratio", "OCC proxy: the paper's mean of "
                                                                "per-token ratios, or the least-squares slope")
    occ_clip: list[float] = opt([], "optional [lo, hi] clamp of the OCC λ; empty: none (the paper)")
    occ_eps: float = opt(1e-8, "ε of the OCC proxy δμ / (μ² + ε) and of the occ-exact slope ⟨g_RL, g⟩ / (‖g‖² + ε)")

    # ----- batch layout ----------------------------------------------------------------------------
    steps: int = opt(100, "training steps (one rollout batch each)")
    prompts_per_step: int = opt(16, "prompts per rollout batch (the global batch, over all workers)")
    group_size: int = opt(8, "responses sampled per prompt (GRPO group), >= 2")
    mini_batches: int = opt(4, "optimiser steps per rollout batch and epoch (the paper's recipe uses 4); must "
                               "divide prompts_per_step × group_size")
    epochs: int = opt(1, "passes over each rollout batch")
    micro_batch_size: int = opt(16, "sequences per forward/backward (gradient accumulation within a mini-batch)")
    sort_micro_batches: bool = opt(False, "run the forward passes on each mini-batch's rows sorted by response length "
                                          "(less padding); losses, OCC's ĉ and gradients are still formed per "
                                          "unsorted micro-batch, so they equal those without it up to float "
                                          "rounding; holds a whole mini-batch's graph at once")

    # ----- optimiser ------------------------------------------------------------------------------
    lr: float = opt(1e-4, "AdamW learning rate (constant after warm-up)")
    warmup_steps: int = opt(0, "optimiser updates of linear warm-up from 0 (a step makes mini_batches × epochs)")
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to norms and other 1-D parameters)")
    max_grad_norm: float = opt(1.0, "gradient clipping norm, applied to shared and MTP-only parameters "
                                    "separately; 0: no clipping")

    # ----- policy loss ----------------------------------------------------------------------------
    clip_low: float = opt(0.2, "lower clip ε_low: ratios below 1 − ε_low stop the gradient when A < 0")
    clip_high: float = opt(0.28, "upper clip ε_high (DAPO clip-higher): ratios above 1 + ε_high stop it when A > 0")
    dual_clip: float | None = opt(DEFAULT_DUAL_CLIP, "dual-clip constant c > 1 for A < 0, main and MTP surrogate (10: the "
                                             "paper's script); null: off")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = opt(
        "token-mean", "how per-token losses are reduced (token-mean: DAPO)")
    adv_scale: Literal["group", "batch", "none"] = opt("group", "advantage scaling: group std (GRPO), batch std, "
                                                               "none (Dr. GRPO)")
    kl_coef: float = opt(0.0, "β of the KL loss to the frozen initial model; 0: off (no reference model is kept)")
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k3", "KL estimator of the KL loss")

    # ----- DAPO sampling and reward shaping ------------------------------------------------------
    dynamic_sampling: bool = opt(True, "drop groups whose rewards are all equal and draw more prompts until the "
                                       "batch is full")
    max_draws: int = opt(4, "rollout rounds per step with dynamic sampling; if still short, dropped groups "
                            "fill the batch")
    first_draws: int = opt(1, "with dynamic sampling, sample the first this many draws as one batch of the engine "
                              "(cheaper per sample; but other tokens than one draw after another under the same "
                              "seed, and the extra problems are used up even when the first draw would do)")
    overlong_buffer: int = opt(0, "DAPO overlong shaping: responses in the last this many tokens before "
                                  "max_new_tokens lose up to overlong_penalty; 0: off")
    overlong_penalty: float = opt(1.0, "largest overlong penalty (at max_new_tokens)")

    # ----- rollouts -------------------------------------------------------------------------------
    max_new_tokens: int = opt(96, "longest response in tokens")
    temperature: float = opt(1.0, "sampling temperature of rollouts (log-probs are computed at it too)")
    top_p: float = opt(1.0, "nucleus sampling of rollouts; 1: off")
    top_k: int = opt(0, "top-k sampling of rollouts; 0: off")
    draft_tokens: int = opt(0, "speculative rollouts: tokens drafted by the MTP heads per step; 0: plain sampling")
    rollout_backend: Literal["ours", "vllm"] = opt("ours", "engine of the training rollouts: ours, or a colocated vLLM "
                                                           "engine (weights pushed after every step, MTP layers "
                                                           "included; draft_tokens -> num_speculative_tokens; one "
                                                           "engine per process); evaluation stays on ours")
    rollout_rng: Literal["batch", "prompt"] = opt("batch", "random numbers of rollouts and evaluation samples: batch "
                                                          "(one generator per worker, seeded by seed, step and rank: "
                                                          "the responses depend on how prompts are split over "
                                                          "workers) or prompt (one generator per prompt group, seeded "
                                                          "by seed, step and the prompt's index: the same responses "
                                                          "on any number of processes, so a run can resume on "
                                                          "another process count); set when the run starts")
    vllm_kv_cache_mb: int = opt(256, "KV cache of the vLLM engine in MiB (rollout_backend vllm)")
    tis_cap: float = opt(0.0, "truncated importance sampling against the vLLM engine's log-probs: each token's "
                              "policy-gradient term weighted by min(π_old / π_vllm, tis_cap); 0: off "
                              "(rollout_backend vllm only)")
    reuse_rollout_log_probs: bool = opt(False, "an approximation: take the old log-probs from the rollout instead of "
                                               "recomputing them in the training layout (saves that forward pass; "
                                               "they differ by float rounding, ~1e-5, so the ratio and OCC's λ are "
                                               "not exactly 1 and 0 on the first mini-batch); needs top_p 1, top_k 0")

    # ----- evaluation and diagnostics -------------------------------------------------------------
    eval_every: int = opt(25, "evaluate every this many steps (and always at the end); 0: only at the end")
    eval_at_start: bool = opt(True, "also evaluate the starting model (step 0) on a fresh run")
    eval_k: int = opt(4, "samples per problem for avg@k")
    eval_temperature: float = opt(0.6, "sampling temperature of avg@k (greedy pass@1 is also reported)")
    eval_limit: int = opt(32, "problems per held-out suite in the intermediate evaluations")
    final_eval_limit: int = opt(0, "problems per held-out suite in the final evaluation (the intermediate ones are "
                                   "its first eval_limit); 0: eval_limit")
    exact_every: int = opt(10, "every this many steps log the exact gradient terms on the shared parameters "
                               "(two extra backward passes per head); 0: never")

    # ----- run directory, checkpoints, logging ----------------------------------------------------
    output_dir: str = opt("runs/train", "the run directory: config.yaml, metrics.jsonl, summary.json, checkpoints/")
    save_every: int = opt(50, "write a checkpoint every this many steps (and at the end); 0: only at the end")
    keep_checkpoints: int = opt(0, "keep only the newest this many checkpoints; 0: keep all")
    resume: str = opt("none", "'none' (fresh run), 'auto' (latest complete checkpoint in output_dir, if any) or a "
                              "checkpoint directory; a bare --resume means auto")
    overwrite: bool = opt(False, "allow a fresh run to replace the metrics of an existing run directory")
    log_with: Literal["none", "tensorboard", "wandb"] = opt("none", "extra tracker through accelerate (the JSONL "
                                                                     "file is always written)")
    project: str = opt("mtprl", "tracker project name")
    progress: bool = opt(True, "show a progress bar (step, reward, accuracy, λ)")
    seed: int = opt(0, "seed of prompts, sampling and shuffling: same seed, same run")
    parallel: Literal["ddp", "fsdp"] = opt("ddp", "with several processes: ddp (a full copy of the model, its gradients "
                                                 "and AdamW state per worker) or fsdp (FSDP2: all three sharded over the "
                                                 "workers; sharded checkpoints); an accelerate FSDP config selects fsdp")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto: CUDA when available, else CPU")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "precision of the model weights in training (bfloat16: "
                                                           "AdamW updates the bf16 weights directly)")

    def validate(self) -> None:
        """Reject impossible or inconsistent values with a message naming the field and the fix."""
        self._validate_batch()
        self._validate_optimisation()
        self._validate_sampling()
        self._validate_paths()

    def _validate_batch(self) -> None:
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(self.prompts_per_step >= 1, f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        require(self.group_size >= 2, f"group_size must be >= 2 (group advantages compare responses to the same "
                                      f"prompt), got {self.group_size}")
        require(self.mini_batches >= 1, f"mini_batches must be >= 1, got {self.mini_batches}")
        batch = self.prompts_per_step * self.group_size
        require(batch % self.mini_batches == 0,
                f"mini_batches ({self.mini_batches}) must divide the rollout batch prompts_per_step × group_size = "
                f"{self.prompts_per_step} × {self.group_size} = {batch}; choose a divisor of {batch}")
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.micro_batch_size >= 1, f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        from mtprl.losses import MTP_REGIMES

        require(self.regime in MTP_REGIMES, f"regime must be one of {', '.join(MTP_REGIMES)} (the registered "
                                            f"regimes); got {self.regime!r}")
        if self.num_mtp_layers is not None:
            require(self.num_mtp_layers >= 1, f"num_mtp_layers must be >= 1 or null, got {self.num_mtp_layers}")
        if self.parallel == "fsdp":
            require(not MTP_REGIMES[self.regime].needs_exact_slopes,
                    f"regime {self.regime} takes gradients of the shared parameters with torch.autograd.grad in "
                    "every micro-batch, which sharded (FSDP) parameters do not support; use parallel: ddp")

    def _validate_optimisation(self) -> None:
        require(self.lr >= 0, f"lr must be >= 0 (the learning rate), got {self.lr}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "mtp_coef", "occ_eps", "kl_coef",
                     "overlong_penalty",
                     "overlong_buffer", "eval_every", "exact_every", "save_every", "keep_checkpoints", "top_k",
                     "draft_tokens"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        require(0 <= self.clip_low < 1, f"clip_low must lie in [0, 1), got {self.clip_low}")
        require(self.clip_high >= 0, f"clip_high must be >= 0, got {self.clip_high}")
        require(self.dual_clip is None or self.dual_clip > 1, f"dual_clip must be > 1 or null, got {self.dual_clip}")
        require(len(self.occ_clip) in (0, 2) and (not self.occ_clip or self.occ_clip[0] <= self.occ_clip[1]),
                f"occ_clip must be empty or two numbers lo <= hi, got {self.occ_clip}")

    def _validate_sampling(self) -> None:
        require(self.max_draws >= 1, f"max_draws must be >= 1, got {self.max_draws}")
        require(1 <= self.first_draws <= self.max_draws,
                f"first_draws must lie in [1, max_draws = {self.max_draws}], got {self.first_draws}")
        require(self.first_draws == 1 or self.dynamic_sampling,
                f"first_draws = {self.first_draws} needs dynamic_sampling (without it a step makes one draw)")
        require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        require(self.overlong_buffer < self.max_new_tokens,
                f"overlong_buffer ({self.overlong_buffer}) must be smaller than max_new_tokens ({self.max_new_tokens})")
        require(self.max_prompt_tokens >= 2, f"max_prompt_tokens must be >= 2, got {self.max_prompt_tokens}")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(self.eval_temperature > 0, f"eval_temperature must be > 0 (greedy is reported separately), "
                                           f"got {self.eval_temperature}")
        require(0 < self.top_p <= 1, f"top_p must lie in (0, 1], got {self.top_p}")
        require(not self.reuse_rollout_log_probs or (self.top_p == 1 and self.top_k == 0),
                f"reuse_rollout_log_probs needs top_p 1 and top_k 0 (got {self.top_p}, {self.top_k}): the rollout's "
                "log-probs are those of the filtered distribution, the update's of the plain softmax")
        require(self.eval_k >= 1, f"eval_k must be >= 1, got {self.eval_k}")
        require(self.tis_cap == 0 or self.tis_cap >= 1, f"tis_cap must be 0 (off) or >= 1, got {self.tis_cap}")
        require(self.tis_cap == 0 or self.rollout_backend == "vllm",
                "tis_cap corrects for the vLLM engine's log-probs differing from the trainer's; with "
                "rollout_backend ours they are the same, so set rollout_backend: vllm or tis_cap: 0")
        require(not (self.rollout_backend == "vllm" and self.reuse_rollout_log_probs),
                "rollout_backend vllm recomputes the old log-probs in the trainer (the vLLM engine's differ from "
                "them, and that off-policy error is what rollout/mismatch_* and tis_cap measure and correct); "
                "set reuse_rollout_log_probs: false")
        require(not (self.rollout_backend == "vllm" and self.rollout_rng == "prompt"),
                "rollout_rng prompt makes a prompt's samples independent of how prompts are split over processes, "
                "for our engine; each process's vLLM engine seeds every request itself, so use "
                "rollout_rng: batch with rollout_backend vllm")
        require(self.vllm_kv_cache_mb >= 1, f"vllm_kv_cache_mb must be >= 1, got {self.vllm_kv_cache_mb}")
        require(self.rollout_backend != "vllm" or importlib.util.find_spec("vllm") is not None,
                "rollout_backend vllm needs vLLM: `pip install mtprl[vllm]` on GPUs, `make install-vllm` on CPU "
                "(then run with .venv-vllm/bin/mtprl)")
        require(self.eval_limit >= 1, f"eval_limit must be >= 1, got {self.eval_limit}")
        require(self.final_eval_limit == 0 or self.final_eval_limit >= self.eval_limit,
                f"final_eval_limit ({self.final_eval_limit}) must be 0 (same as eval_limit) or at least eval_limit "
                f"({self.eval_limit}): the intermediate problems are the first ones of the final set")

    def _validate_paths(self) -> None:
        if self.model != TINY_DEFAULT:
            path = Path(self.model)
            require(path.is_dir() and (path / "config.json").is_file(),
                    f"model '{self.model}' is not a local Hugging Face checkpoint directory (no config.json there); "
                    f"pass such a directory or '{TINY_DEFAULT}'")
        for name, path in [("data", self.data)] + [("eval_data", p) for p in self.eval_data]:
            if path is not None:
                require(Path(path).exists(), f"{name} file '{path}' does not exist; pass an existing .jsonl, "
                                             ".parquet file or datasets directory")
        require(self.data is not None or not self.eval_data, "eval_data is for --data runs; the generated families "
                                                             "are evaluated on their held-out suites (eval_suites)")
        self._validate_names()
        require(self.resume in ("none", "auto") or Path(self.resume).is_dir(),
                f"resume must be 'none', 'auto' or an existing checkpoint directory; got '{self.resume}'")
        package = _TRACKER_PACKAGES.get(self.log_with)
        require(package is None or importlib.util.find_spec(package) is not None,
                f"log_with '{self.log_with}' needs the '{package}' package; install it or use log_with: none")

    def _validate_names(self) -> None:
        from mtprl.tasks import SUITES, TASKS

        require(bool(self.families), "families must name at least one task family")
        for name in self.families:
            require(name in TASKS, f"unknown task family '{name}' in families; known: {', '.join(sorted(TASKS))}")
        for name in self.eval_suites:
            require(name in SUITES, f"unknown suite '{name}' in eval_suites; known: {', '.join(SUITES)}")


# Settings that do not change a run's result (its metrics, apart from timings, and its weights): a run
# may be resumed, or re-used by `mtprl compare`, with other values of these. Every other field counts.
NOT_RESULT_AFFECTING = frozenset({"resume", "progress", "overwrite", "output_dir", "log_with", "project",
                                  "save_every", "keep_checkpoints", "parallel"})


def result_differences(recorded: dict, cfg: TrainConfig) -> list[str]:
    """'field: recorded there, now here' for every result-affecting field where `cfg` differs from `recorded`.

    `recorded` is a config as a run wrote it (config.yaml, or a checkpoint's trainer state); a field
    it lacks (written before the field existed) counts as that field's default.
    """
    defaults = config_to_dict(TrainConfig())
    wanted = config_to_dict(cfg)
    return [f"{k}: {recorded.get(k, defaults[k])!r} there, {v!r} now" for k, v in wanted.items()
            if k not in NOT_RESULT_AFFECTING and recorded.get(k, defaults[k]) != v]


def checked(cfg: TrainConfig) -> TrainConfig:
    """`cfg` rebuilt through the config loader: keys, types and values checked as for a YAML file."""
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"train() needs a TrainConfig, got {type(cfg).__name__}")
    return build_config(TrainConfig, config_to_dict(cfg), "the TrainConfig")
