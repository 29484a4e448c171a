"""Per-token estimators of KL(π_θ ‖ π_ref) from samples of π_θ, and the KL penalty loss.

With x = ℓ − ℓ_ref (current minus reference log-prob of the sampled token), Schulman's estimators:
- k1 = x                      unbiased, high variance, can be negative
- k2 = x² / 2                 biased, low variance; its gradient is the reverse-KL gradient
- k3 = exp(−x) + x − 1        unbiased, low variance, >= 0 (GRPO's KL term, verl "low_var_kl")
Conventions follow verl: k3 clamps x to ±20 before exponentiating and its value to at most 10;
k1 and k2 are not clamped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mtprl.losses._validate import as_mask, check_choice, check_ndim, check_shape
from mtprl.losses.aggregate import Count, aggregate, metrics_to_floats

K3_CLAMP = 10.0


def _k1(x: Tensor) -> Tensor:
    return x


def _k2(x: Tensor) -> Tensor:
    return 0.5 * x.square()


def _k3(x: Tensor) -> Tensor:
    neg = (-x).clamp(-20.0, 20.0)
    return (torch.exp(neg) - neg - 1.0).clamp(max=K3_CLAMP)


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(log_prob: Tensor, ref_log_prob: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL estimate `[B, T]` from `log_prob [B, T]` and `ref_log_prob [B, T]` (no grad)."""
    check_choice("KL estimator", estimator, KL_ESTIMATORS)
    check_shape("ref_log_prob", ref_log_prob, log_prob.shape, "log_prob")
    return KL_ESTIMATORS[estimator](log_prob - ref_log_prob.detach())


def kl_loss(
    log_prob: Tensor,
    ref_log_prob: Tensor,
    mask: Tensor,
    estimator: str = "k3",
    agg: str = "token-mean",
    *,
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    norm_length: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """KL penalty: the estimator over the valid tokens of `mask [B, T]`, reduced like the policy loss.

    Multiply by the KL coefficient β yourself. Returns (0-dim loss, {"kl/loss": value}).
    """
    check_choice("KL estimator", estimator, KL_ESTIMATORS)
    check_ndim("log_prob", log_prob, 2, "[B, T]")
    check_shape("ref_log_prob", ref_log_prob, log_prob.shape, "log_prob")
    mask = as_mask(mask, log_prob)
    x = torch.where(mask, log_prob - ref_log_prob.detach(), 0.0)  # [B, T]
    loss_mat = KL_ESTIMATORS[estimator](x)  # [B, T]
    loss = aggregate(loss_mat, mask, agg, global_tokens=global_tokens, global_seqs=global_seqs, norm_length=norm_length)
    return loss, metrics_to_floats({"kl/loss": loss})
