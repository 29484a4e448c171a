"""TRL adapter (TRL 1.16): `MTPGRPOTrainer` trains an `MTPCausalLM` with TRL's `GRPOTrainer` under any regime.

The trainer changes two of TRL's extension points and nothing else:
- `_get_per_token_logps_and_entropies`: one forward of `MTPCausalLM.token_log_probs` gives TRL its
  main-head log-probs and entropies; inside the loss computation it also keeps the MTP heads'
  log-probs of the same completion tokens (`[K, B, T]`, aligned to the main head's positions).
- `_compute_loss`: TRL's own loss (every loss type, KL, entropy bonus, masks, importance weights)
  plus the MTP term Σ_k term_k of `mtprl.losses.mtp_loss`, reduced the way TRL reduces its loss for
  `loss_type` (`trl_aggregation`). λ_k, ĉ_k, the proxy and the other MTP metrics (the same keys under
  every regime) go to TRL's metrics (`mtp/0/lambda`, `mtp/0/proxy_c_hat`, ... next to `reward`,
  `entropy`, `clip_ratio/*`).
The model is set up for the regime by `mtprl.model.apply_regime`, the trainer's own function, from
the regime's record in `mtprl.losses.MTP_REGIMES`.
OCC's δ = ℓ − ℓ° is non-zero only when TRL keeps old log-probs from before an optimiser step, i.e.
when `steps_per_generation` > `gradient_accumulation_steps` (several optimiser steps per rollout
batch; the paper uses 4) or `num_iterations` > 1. Otherwise TRL uses ℓ° = ℓ.detach() and λ ≡ 0.

Departures from TRL's loss and the paper:
- The MTP surrogate is always the token-level clipped surrogate with TRL's `epsilon` /
  `epsilon_high` and our dual clip (`dual_clip`, default 10 as in the paper's script; TRL's main loss
  has none), whatever TRL's `loss_type` (cispo, sapo, vespo change the main term only),
  `importance_sampling_level`, `delta` and off-policy / entropy masks; only its reduction follows
  `loss_type`. As in the authors' code, λ scales the advantages inside it (`mtprl.losses.mtp_heads`).
- Main log-probs come from `token_log_probs`, whose positions count real tokens only, so left
  padding does not shift them; TRL's own forward passes no position ids (same numbers without padding).
- Metrics are averaged over processes; ĉ is computed per micro-batch and process.
- Text-only: multimodal inputs and the MoE router auxiliary loss are refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import Dataset
from torch import Tensor
from transformers.trainer import TRAINING_ARGS_NAME
from trl import GRPOTrainer

from mtprl.losses import DUAL_CLIP, exact_slopes, mtp_head_losses, mtp_loss
from mtprl.model import LogProbs, MTPCausalLM, apply_regime
from mtprl.tasks import Problem, TaskFamily

logger = logging.getLogger(__name__)

TRL_LOSS_TYPES = ("grpo", "sapo", "bnpo", "dr_grpo", "luspo", "dapo", "cispo", "vespo")


class TRLMTPCausalLM(MTPCausalLM):
    """`MTPCausalLM` with the Hugging Face model API that TRL's trainer calls, delegated to `.base`.

    Adds methods only (no state): `MTPGRPOTrainer` switches a plain `MTPCausalLM` to this class.
    `forward(..., mtprl_log_probs={...})` returns `token_log_probs(...)`, so the training forward runs
    through `model(...)` and hence through DDP / FSDP wrappers.
    """

    def forward(self, input_ids=None, attention_mask=None, *, mtprl_log_probs: dict | None = None, **kwargs):
        if mtprl_log_probs is not None:
            return self.token_log_probs(input_ids, attention_mask, **mtprl_log_probs)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @property
    def generation_config(self):
        return self.base.generation_config

    def generate(self, *args, **kwargs):
        return self.base.generate(*args, **kwargs)

    # Activation checkpointing of the trunk (the MTP layers are not checkpointed).
    @property
    def is_activation_checkpointing(self) -> bool:
        return self.base.is_activation_checkpointing

    def activation_checkpointing_enable(self, *args, **kwargs):
        return self.base.activation_checkpointing_enable(*args, **kwargs)

    def activation_checkpointing_disable(self):
        return self.base.activation_checkpointing_disable()

    # The names TRL 1.16 still calls (deprecated aliases in transformers 5).
    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.base.is_activation_checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        return self.base.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        return self.base.activation_checkpointing_disable()

    def add_model_tags(self, tags):
        return self.base.add_model_tags(tags)


def trl_aggregation(
    loss_type: str,
    mask: Tensor,
    *,
    training: bool,
    grad_accum: int,
    steps_per_generation: int,
    num_items_in_batch: Tensor | float | None,
    num_processes: int,
    max_completion_length: int | None,
) -> tuple[dict[str, Any], float]:
    """(`mtprl.losses.aggregate` options, factor) that reduce a `[B, T]` loss like TRL 1.16 reduces its loss.

    TRL: grpo/sapo mean over the B rows of per-row token means; bnpo token mean; dr_grpo sum /
    (B · max_completion_length); luspo mean over rows of row sums — each / grad_accum in training.
    dapo/cispo/vespo: sum / (num_items_in_batch / num_processes), × grad_accum / steps_per_generation
    in training (num_items_in_batch counts the whole generation batch).
    """
    rows = mask.shape[0]
    accum = 1.0 / grad_accum if training else 1.0
    if loss_type in ("grpo", "sapo"):
        return {"agg": "seq-mean-token-mean", "global_seqs": rows}, accum
    if loss_type == "bnpo":
        return {"agg": "token-mean"}, accum
    if loss_type == "dr_grpo":
        return {"agg": "seq-mean-token-sum-norm", "global_seqs": rows, "norm_length": max_completion_length}, accum
    if loss_type == "luspo":
        return {"agg": "seq-mean-token-sum", "global_seqs": rows}, accum
    if loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is None:
            raise ValueError(f"loss_type {loss_type!r} needs num_items_in_batch (TRL puts it in the inputs)")
        normalizer = torch.as_tensor(num_items_in_batch, dtype=torch.float32).clamp(min=1.0) / num_processes
        if training:
            normalizer = normalizer * grad_accum / steps_per_generation
        return {"agg": "token-mean", "global_tokens": normalizer}, 1.0
    raise ValueError(f"unknown TRL loss_type {loss_type!r}; supported: {', '.join(TRL_LOSS_TYPES)}")


class MTPGRPOTrainer(GRPOTrainer):
    """TRL's `GRPOTrainer` for an `MTPCausalLM`, adding the MTP term of `mtp_regime` (module docstring).

    `mtp_regime`: a registered regime (`mtprl.losses.MTP_REGIMES`; default occ); `mtp_coef`: λ₀ (split
    over the K heads); `occ_estimator`, `occ_clip`, `occ_eps` and `dual_clip` (of the MTP surrogate):
    those of `mtprl.losses.mtp_loss`. Every other argument is `GRPOTrainer`'s. Checkpoints are written with `MTPCausalLM.save_pretrained`
    (MiMo layout, loadable with `MTPCausalLM.from_pretrained`).
    """

    def __init__(
        self,
        model: MTPCausalLM,
        *args,
        mtp_regime: str = "occ",
        mtp_coef: float = 0.1,
        occ_estimator: str = "mean-ratio",
        occ_clip: tuple[float, float] | None = None,
        occ_eps: float = 1e-8,
        dual_clip: float | None = DUAL_CLIP,
        **kwargs,
    ):
        if not isinstance(model, MTPCausalLM):
            raise TypeError(f"MTPGRPOTrainer trains an mtprl MTPCausalLM, got {type(model).__name__}; "
                            "load one with MTPCausalLM.from_pretrained(path) or use TRL's GRPOTrainer")
        if type(model) is not MTPCausalLM and not isinstance(model, TRLMTPCausalLM):
            raise TypeError(f"{type(model).__name__} subclasses MTPCausalLM; derive it from "
                            "mtprl.integrations.trl.TRLMTPCausalLM instead so TRL finds the HF model API")
        self.regime = apply_regime(model, mtp_regime)
        if type(model) is MTPCausalLM:
            model.__class__ = TRLMTPCausalLM  # adds the HF API methods only (class docstring)
        self.mtp_regime, self.mtp_coef = mtp_regime, mtp_coef
        self.occ_options = {"occ_estimator": occ_estimator, "occ_clip": occ_clip, "occ_eps": occ_eps}
        self.dual_clip = dual_clip
        self._mtp_capture: list[tuple[Tensor, Tensor, Tensor]] | None = None
        super().__init__(model, *args, **kwargs)
        if self.loss_type not in TRL_LOSS_TYPES:
            raise ValueError(f"MTPGRPOTrainer supports loss_type in {TRL_LOSS_TYPES}, got {self.loss_type!r}")
        if self.regime.uses_drift and self.num_iterations == 1 and (
            self.args.steps_per_generation <= self.args.gradient_accumulation_steps
        ):
            logger.warning(f"{mtp_regime}: OCC's λ stays 0: with num_iterations=1 and steps_per_generation <= "
                           "gradient_accumulation_steps every optimiser step sees θ = θ_old. Set steps_per_generation "
                           "to a multiple (> 1) of gradient_accumulation_steps (the paper: 4 mini-batches per rollout).")

    # ----- TRL extension point 1: per-token log-probs --------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **multimodal):
        """TRL's contract: (log-probs `[B, logits_to_keep]`, entropies or None, aux loss None)."""
        if any(value is not None for value in multimodal.values()) or compute_aux_loss:
            raise ValueError("MTPGRPOTrainer is text-only: multimodal inputs and the MoE router aux loss are "
                             "not supported; use TRL's GRPOTrainer for those models")
        capture = self._mtp_capture is not None
        request = {"temperature": self.temperature, "with_entropy": compute_entropy, "mtp": capture}
        step = batch_size or input_ids.size(0)
        outs: list[LogProbs] = []
        for start in range(0, input_ids.size(0), step):
            with self.accelerator.autocast():
                outs.append(model(input_ids=input_ids[start:start + step],
                                  attention_mask=attention_mask[start:start + step], mtprl_log_probs=request))
        keep = slice(input_ids.size(1) - logits_to_keep, None)
        logps = torch.cat([o.log_probs[:, keep] for o in outs])  # [B, T]
        entropies = torch.cat([o.entropy[:, keep] for o in outs]) if compute_entropy else None
        if capture:
            mtp = torch.cat([o.mtp_log_probs[:, :, keep] for o in outs], dim=1)  # [K, B, T]
            mtp_mask = torch.cat([o.mtp_mask[:, :, keep] for o in outs], dim=1)  # [K, B, T]
            self._mtp_capture.append((logps, mtp, mtp_mask))
        return logps, entropies, None

    # ----- TRL extension point 2: the loss ---------------------------------------------------
    def _compute_loss(self, model, inputs):
        self._mtp_capture = []
        try:
            loss = super()._compute_loss(model, inputs)
            captured = self._mtp_capture
        finally:
            self._mtp_capture = None
        mode = "train" if self.model.training else "eval"
        log_prob, mtp, mtp_mask = captured[-1]
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        options, scale = trl_aggregation(
            self.loss_type, mask, training=mode == "train",
            grad_accum=self.current_gradient_accumulation_steps if mode == "train" else 1,
            steps_per_generation=self.args.steps_per_generation, num_items_in_batch=inputs.get("num_items_in_batch"),
            num_processes=self.accelerator.num_processes, max_completion_length=self.max_completion_length,
        )
        inputs_mtp = dict(
            mtp_log_prob=mtp, mtp_mask=mtp_mask & mask.bool()[None], old_log_prob=log_prob.detach() if old is None else old,
            log_prob=log_prob, advantages=inputs["advantages"], clip_low=self.epsilon_low,
            clip_high=self.epsilon_high, dual_clip=self.dual_clip, **options,
        )
        slopes = self._exact_slopes(model, loss, scale, inputs_mtp) if self.regime.needs_exact_slopes else None
        term, metrics = mtp_loss(self.regime, coef=self.mtp_coef, exact_slope=slopes, **self.occ_options,
                                 **inputs_mtp)
        self._log_mtp_metrics(metrics, mode)
        return loss + scale * term

    def _exact_slopes(self, model, loss_rl: Tensor, scale: float, inputs_mtp: dict) -> list[float]:
        """⟨g_RL, g_k⟩ / (‖g_k‖² + ε) on the shared parameters, one per head (two extra backward passes)."""
        heads = [scale * head for head in mtp_head_losses(self.regime, **inputs_mtp)]
        shared = self.accelerator.unwrap_model(model).shared_parameters()
        return exact_slopes(shared, loss_rl, heads, self.occ_options["occ_eps"])

    def _log_mtp_metrics(self, metrics: dict[str, float], mode: str) -> None:
        """Append the MTP metrics, averaged over processes, to TRL's metrics of this step."""
        names = sorted(metrics)
        values = torch.tensor([metrics[n] for n in names], device=self.accelerator.device)
        values = self.accelerator.gather(values[None]).nanmean(0).tolist()
        for name, value in zip(names, values):
            self._metrics[mode][name].append(value)

    # ----- checkpoints in the MTP layout --------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, tokenizer=self.processing_class)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        loaded = MTPCausalLM.from_pretrained(resume_from_checkpoint, num_mtp_layers=target.num_mtp)
        target.load_state_dict(loaded.state_dict())


# ----- our tasks as TRL data and reward functions ---------------------------------------------
def task_dataset(problems: Sequence[Problem]) -> Dataset:
    """A TRL prompt dataset: columns prompt, answer, family, difficulty, meta (JSON text)."""
    return Dataset.from_dict({
        "prompt": [p.prompt for p in problems],
        "answer": [p.answer for p in problems],
        "family": [p.family for p in problems],
        "difficulty": [p.difficulty for p in problems],
        "meta": [json.dumps(p.meta) for p in problems],
    })


def task_reward_function(task: TaskFamily) -> Callable[..., list[float]]:
    """`task.reward` as a TRL reward function `f(prompts, completions, answer, **columns) -> list[float]`.

    TRL passes the dataset's other columns as keyword lists; `answer` is required, `difficulty` and
    `meta` (JSON text, as written by `task_dataset`) are used when present. Conversational
    completions are scored on their last message's content.
    """

    def reward(prompts, completions, answer=None, **columns) -> list[float]:
        if answer is None:
            raise ValueError(f"the {task.name} reward needs an 'answer' column in the dataset (see task_dataset)")
        difficulty = columns.get("difficulty") or [0] * len(prompts)
        meta = columns.get("meta") or ["{}"] * len(prompts)
        rewards = []
        for prompt, completion, ans, level, extra in zip(prompts, completions, answer, difficulty, meta, strict=True):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            problem = Problem(prompt=prompt if isinstance(prompt, str) else "", answer=ans, solution="",
                              family=task.name, difficulty=int(level), meta=json.loads(extra))
            rewards.append(task.reward(problem, text))
        return rewards

    reward.__name__ = reward.__qualname__ = f"{task.name}_reward"
    return reward


__all__ = [
    "TRL_LOSS_TYPES", "MTPGRPOTrainer", "TRLMTPCausalLM", "task_dataset", "task_reward_function", "trl_aggregation",
]
