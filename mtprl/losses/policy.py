"""The clipped policy-gradient surrogate (PPO / GRPO / DAPO) and its metrics.

Per valid token, with log-ratio r_log = ℓ − ℓ° clamped to ±20 and ratio r = exp(r_log):
    l = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high))            (DAPO clip-higher: 0.2 / 0.28)
and with `dual_clip = c` (> 1), only where A < 0:  l = min(l, −A·c)  (bounds the loss as r grows).
Conventions follow verl: log-ratio clamp ±20, dual clip only for A < 0 and c > 1, token-mean default.
Departure from verl's defaults: the dual clip is on by default with c = 10 (`DUAL_CLIP`), the value of
the paper's launch script (MarkXCloud/RL-MTP, `clip_ratio_c=10.0`); verl's own default is 3. Pass
`dual_clip=None` to switch it off.

Metrics (python floats, computed over the valid tokens of this call; names in `SURROGATE_METRICS`):
- clipfrac_low    A < 0 and r < 1 − clip_low   (the lower bound cuts the gradient)
- clipfrac_high   A > 0 and r > 1 + clip_high  (the upper bound cuts the gradient)
- dual_clipfrac   A < 0 and r > c              (0 without dual clip)
- approx_kl       mean of (r − 1) − log r, the k3 estimate of KL(π_old ‖ π_θ) (CleanRL's approx_kl)
- ppo_kl          mean of −log r, the k1 estimate (verl's ppo_kl)
- ratio_mean / ratio_min / ratio_max of the clamped ratio (1.0 when no token is valid)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mtprl.losses._validate import as_mask, check_ndim, check_shape
from mtprl.losses.aggregate import Count, aggregate, masked_extremes, masked_mean, metrics_to_floats

LOG_RATIO_CLAMP = 20.0
DUAL_CLIP = 10.0  # the default dual-clip constant c (the paper's script); None switches the dual clip off
SURROGATE_METRICS = ("clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl", "ppo_kl", "ratio_mean",
                     "ratio_min", "ratio_max")


class ClipMasks(NamedTuple):
    """Where the surrogate's clipping is active, per token (all `[B, T]`, detached)."""

    ratio: Tensor  # [B, T] exp of the clamped log-ratio
    low: Tensor  # [B, T] bool: A < 0 and ratio < 1 - clip_low
    high: Tensor  # [B, T] bool: A > 0 and ratio > 1 + clip_high
    dual: Tensor  # [B, T] bool: A < 0 and ratio > dual_clip (all False without dual clip)


def check_clip_range(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    """Raise unless 0 <= clip_low < 1, clip_high >= 0 and dual_clip is None or > 1."""
    def is_number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not is_number(value) or not value >= 0:
            raise ValueError(
                f"{name} must be >= 0 (e.g. 0.2; the ratio is clipped to [1-clip_low, 1+clip_high]), got {value!r}"
            )
    if not clip_low < 1:
        raise ValueError(f"clip_low must be < 1 so that the lower bound 1 - clip_low stays positive, got {clip_low!r}")
    if dual_clip is not None and (not is_number(dual_clip) or not dual_clip > 1):
        raise ValueError(f"dual_clip must be None or > 1 (e.g. 3.0), got {dual_clip!r}")


def broadcast_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """Advantages `[B]` (one per sequence) or `[B, T]` (per token) as `[B, T]`, detached."""
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if advantages.ndim == 1:
        check_shape("advantages", advantages, like.shape[:1], "the batch dimension of log_prob")
        return advantages.detach()[:, None].expand_as(like)  # [B, T]
    check_shape("advantages", advantages, like.shape, "log_prob (advantages must be [B] or [B, T])")
    return advantages.detach()


def clipped_surrogate(
    log_ratio: Tensor,
    advantages: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = DUAL_CLIP,
) -> tuple[Tensor, ClipMasks]:
    """Per-token clipped surrogate loss `[B, T]` for `log_ratio [B, T]` and `advantages [B]`/`[B, T]`.

    No mask here: callers zero the padding of `log_ratio` (and `advantages`) first, so that nothing
    non-finite enters the graph, then reduce with `aggregate`.
    """
    check_clip_range(clip_low, clip_high, dual_clip)
    check_ndim("log_ratio", log_ratio, 2, "[B, T]")
    adv = broadcast_advantages(advantages, log_ratio)  # [B, T]
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B, T]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)  # [B, T]
    r = ratio.detach()
    dual = torch.zeros_like(r, dtype=torch.bool)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
        dual = (adv < 0) & (r > dual_clip)
    masks = ClipMasks(ratio=r, low=(adv < 0) & (r < 1.0 - clip_low), high=(adv > 0) & (r > 1.0 + clip_high), dual=dual)
    return loss, masks


def no_clips(log_ratio: Tensor) -> ClipMasks:
    """The masks of a term that clips nothing (e.g. a cross-entropy), for its ratio statistics."""
    ratio = torch.exp(log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B, T]
    none = torch.zeros_like(ratio, dtype=torch.bool)
    return ClipMasks(ratio=ratio, low=none, high=none, dual=none)


def surrogate_metrics(log_ratio: Tensor, clips: ClipMasks, mask: Tensor, prefix: str) -> dict[str, Tensor]:
    """`SURROGATE_METRICS` (clip fractions, approx-KL, ratio statistics) over the valid tokens of `mask [B, T]`."""
    log_r = log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    ratio_min, ratio_max = masked_extremes(clips.ratio, mask, empty=1.0)
    values = (
        masked_mean(clips.low, mask),
        masked_mean(clips.high, mask),
        masked_mean(clips.dual, mask),
        masked_mean(clips.ratio - 1.0 - log_r, mask),
        masked_mean(-log_r, mask),
        torch.where(mask.any(), masked_mean(clips.ratio, mask), 1.0),
        ratio_min,
        ratio_max,
    )
    return {f"{prefix}{name}": value for name, value in zip(SURROGATE_METRICS, values, strict=True)}


def policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = DUAL_CLIP,
    agg: str = "token-mean",
    *,
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    norm_length: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Main RL loss L_RL: the clipped surrogate of `log_prob [B, T]` against `old_log_prob [B, T]`.

    `advantages` is `[B]` or `[B, T]`; `mask [B, T]` marks valid response tokens; `agg` and the
    global counts are those of `aggregate`. Returns (0-dim loss, metrics with the `pg/` prefix).
    """
    check_ndim("log_prob", log_prob, 2, "[B, T]")
    check_shape("old_log_prob", old_log_prob, log_prob.shape, "log_prob")
    mask = as_mask(mask, log_prob)
    log_ratio = torch.where(mask, log_prob - old_log_prob.detach(), 0.0)  # [B, T], padding -> ratio 1
    adv = torch.where(mask, broadcast_advantages(advantages, log_prob), 0.0)  # [B, T]
    loss_mat, clips = clipped_surrogate(log_ratio, adv, clip_low, clip_high, dual_clip)
    loss = aggregate(loss_mat, mask, agg, global_tokens=global_tokens, global_seqs=global_seqs, norm_length=norm_length)
    metrics = {"pg/loss": loss, **surrogate_metrics(log_ratio, clips, mask, prefix="pg/")}
    return loss, metrics_to_floats(metrics)
