"""Pre-training loss of the embedded default: next-token CE plus weighted MTP CE (DeepSeek-V3 §2.2).

L = NLL_main + w · (1/K) Σ_k NLL_k, each NLL a mean over its own valid target tokens inside
`loss_mask` (the solution tokens and <eos>; prompts are not trained on). DeepSeek-V3 averages the
depths the same way and scales by its λ (0.3, later 0.1); the schedule of w is the caller's.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pretrain_loss(
    log_probs: Tensor,
    mask: Tensor,
    mtp_log_probs: Tensor,
    mtp_mask: Tensor,
    loss_mask: Tensor,
    mtp_weight: float,
) -> tuple[Tensor, dict[str, float]]:
    """NTP cross-entropy + mtp_weight · mean over depths of the MTP cross-entropy, on `loss_mask` targets.

    log_probs [B, L] and mask [B, L]: the main head's log-prob of each target token and where it is valid;
    mtp_log_probs [K, B, L] and mtp_mask [K, B, L]: the same per MTP depth (aligned to the same targets);
    loss_mask [B, L] bool: the targets to train on. Returns (loss, {loss, main_nll, mtp{k}_nll}).
    """
    main_mask = mask.bool() & loss_mask.bool()  # [B, L]
    main_nll = -(log_probs * main_mask).sum() / main_mask.sum().clamp(min=1)
    depth_masks = mtp_mask.bool() & loss_mask.bool().unsqueeze(0)  # [K, B, L]
    depth_nll = -(mtp_log_probs * depth_masks).sum(dim=(1, 2)) / depth_masks.sum(dim=(1, 2)).clamp(min=1)  # [K]
    mtp_term = depth_nll.mean() if depth_nll.numel() else torch.zeros((), dtype=main_nll.dtype)
    loss = main_nll + mtp_weight * mtp_term
    metrics = {"loss": loss.item(), "main_nll": main_nll.item()}
    for k in range(depth_nll.shape[0]):
        metrics[f"mtp{k + 1}_nll"] = depth_nll[k].item()
    return loss, metrics
