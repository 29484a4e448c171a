"""The rollout engine's off-policy error and truncated importance sampling (TIS) against it.

When another engine samples the rollouts (vLLM), its log-probs ℓ^r_t of the sampled tokens differ
from the trainer's ℓ°_t for the same weights (kernels, precision, batching). The policy loss is
computed against the trainer's ℓ°, so the samples come from π_r while the surrogate assumes π_old:
  mismatch metrics: mean |ℓ° − ℓ^r| over valid tokens, and the share of tokens whose ratio
  π_old/π_r = exp(ℓ° − ℓ^r) lies outside [0.5, 2] (what users watch, e.g. verl's rollout_corr);
  TIS (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"):
  weight each token's policy-gradient term by w_t = min(exp(ℓ° − ℓ^r), C), no gradient.
Because w_t > 0 factors out of the clipped surrogate's min/max (and the dual clip), weighting the
token's loss by w_t equals multiplying its advantage by w_t, which is how `policy_loss` takes it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtprl.losses._validate import as_mask, check_shape


def rollout_mismatch(old_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor) -> dict[str, float]:
    """`rollout/mismatch_abs` (mean |ℓ° − ℓ^r|), `rollout/mismatch_ratio_out` (share of exp(ℓ° − ℓ^r) ∉ [0.5, 2])
    and `rollout/mismatch_max`, over the valid tokens of `mask [B, T]`."""
    check_shape("rollout_log_prob", rollout_log_prob, old_log_prob.shape, "old_log_prob")
    mask = as_mask(mask, old_log_prob)
    diff = (old_log_prob.float() - rollout_log_prob.float())[mask]  # [N] log of π_old / π_rollout
    if diff.numel() == 0:
        return {"rollout/mismatch_abs": 0.0, "rollout/mismatch_ratio_out": 0.0, "rollout/mismatch_max": 0.0}
    out_of_band = (diff.abs() > torch.log(torch.tensor(2.0))).float().mean()
    return {"rollout/mismatch_abs": float(diff.abs().mean()), "rollout/mismatch_ratio_out": float(out_of_band),
            "rollout/mismatch_max": float(diff.abs().max())}


def tis_weights(old_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor, cap: float) -> tuple[Tensor, dict]:
    """Per-token TIS weights min(exp(ℓ° − ℓ^r), cap) `[B, T]` (1 at invalid tokens, no gradient) and metrics.

    Metrics: `tis/weight_mean` (over valid tokens) and `tis/capped_frac` (share of valid tokens at the cap).
    """
    if not cap > 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    check_shape("rollout_log_prob", rollout_log_prob, old_log_prob.shape, "old_log_prob")
    mask = as_mask(mask, old_log_prob)
    ratio = torch.exp((old_log_prob.float() - rollout_log_prob.float()).detach())  # [B, T]
    weights = torch.where(mask, ratio.clamp(max=cap), 1.0)
    n = mask.sum().clamp(min=1)
    return weights, {"tis/weight_mean": float(torch.where(mask, weights, 0.0).sum() / n),
                     "tis/capped_frac": float(((ratio >= cap) & mask).sum() / n)}
