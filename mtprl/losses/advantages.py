"""Group-relative advantages (GRPO, Dr. GRPO, RLOO) for a flat reward vector.

Rewards come as a flat `[N]` vector whose consecutive blocks of `group_size` entries are the
responses to one prompt. Conventions (as in TRL / verl): the std is the unbiased one (divide by
n - 1) and `eps` is added to the std, not to the variance. Departures: a group of one response gets
advantage 0 (verl passes its raw reward through); the "batch" scale divides group-centred rewards by
the unbiased std of all N raw rewards (TRL's `scale_rewards="batch"`). Advantages carry no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtprl.losses._validate import check_choice, check_ndim, check_non_negative

ADVANTAGE_SCALES = ("group", "batch", "none")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """`rewards [N]` as a float `[N / group_size, group_size]` view, after checking the layout."""
    check_ndim("rewards", rewards, 1, "[N] (one reward per response)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1 (responses per prompt), got {group_size!r}")
    n = rewards.shape[0]
    if n == 0 or n % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the number of rewards {n}; "
            f"pass group_size responses for every prompt, consecutively"
        )
    values = rewards.detach()
    if not values.is_floating_point():
        values = values.float()
    return values.reshape(n // group_size, group_size)  # [G, n]


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """GRPO advantages `[N]`: reward minus its group's mean, then scaled.

    scale: "group" divides by the group's unbiased std + eps (GRPO), "batch" by the unbiased std of
    all rewards + eps, "none" leaves the mean-centred reward (Dr. GRPO). A group of one gets 0.
    """
    check_choice("advantage scale", scale, ADVANTAGE_SCALES)
    check_non_negative("eps", eps)
    grouped = _grouped(rewards, group_size)  # [G, n]
    if group_size == 1:
        return torch.zeros_like(grouped).reshape(-1)
    centred = grouped - grouped.mean(-1, keepdim=True)  # [G, n]
    if scale == "group":
        centred = centred / (grouped.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (grouped.std() + eps)
    return centred.reshape(-1)  # [N]


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Leave-one-out advantages `[N]`: r_i minus the mean of the *other* rewards of its group.

    Equals group_size / (group_size - 1) times the mean-centred reward. A group of one gets 0.
    """
    grouped = _grouped(rewards, group_size)  # [G, n]
    if group_size == 1:
        return torch.zeros_like(grouped).reshape(-1)
    others_mean = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)  # [G, n]
    return (grouped - others_mean).reshape(-1)  # [N]
