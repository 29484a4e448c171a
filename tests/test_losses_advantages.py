"""Hand-computed values for group_advantages and rloo_advantages, and their bad-input errors."""

import math

import pytest
import torch

from mtprl.losses import group_advantages, rloo_advantages

# Two prompts, three responses each: group 1 = [1, 0, 1], group 2 = [0, 0, 0].
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def test_group_scale_divides_by_unbiased_group_std_plus_eps():
    # group 1: mean 2/3, centred [1/3, -2/3, 1/3]; unbiased var = (1/9 + 4/9 + 1/9) / 2 = 1/3,
    # std = 1/sqrt(3) = 0.577350; A = centred / (std + 1e-6).
    # group 2: all equal -> centred 0, std 0 -> 0 / (0 + eps) = 0 (eps keeps it finite).
    std = 1 / math.sqrt(3)
    expected = torch.tensor([1 / 3, -2 / 3, 1 / 3, 0.0, 0.0, 0.0]) / torch.tensor([std + 1e-6] * 3 + [1.0] * 3)
    assert torch.allclose(group_advantages(REWARDS, 3), expected, atol=1e-6)
    assert torch.allclose(group_advantages(REWARDS, 3)[:3], torch.tensor([0.577350, -1.154700, 0.577350]), atol=1e-5)


def test_batch_scale_divides_by_unbiased_std_of_all_rewards():
    # all rewards: mean 1/3; unbiased var = (2*(2/3)^2 + 4*(1/3)^2) / 5 = (12/9) / 5 = 4/15,
    # std = 0.516398; group-centred [1/3, -2/3, 1/3, 0, 0, 0] / std.
    expected = torch.tensor([0.645497, -1.290994, 0.645497, 0.0, 0.0, 0.0])
    assert torch.allclose(group_advantages(REWARDS, 3, scale="batch", eps=0.0), expected, atol=1e-5)


def test_none_scale_is_mean_centred_only():
    # Dr. GRPO: [1, 0, 1] - 2/3 and [0, 0, 0] - 0.
    expected = torch.tensor([1 / 3, -2 / 3, 1 / 3, 0.0, 0.0, 0.0])
    assert torch.allclose(group_advantages(REWARDS, 3, scale="none"), expected, atol=1e-7)


def test_group_of_one_gets_zero_and_integer_rewards_are_accepted():
    for scale in ("group", "batch", "none"):
        assert torch.equal(group_advantages(torch.tensor([1, 0, 1]), 1, scale=scale), torch.zeros(3))
    # group of two, integer rewards [1, 0]: centred [0.5, -0.5], unbiased std = sqrt(0.5) = 0.707107.
    expected = torch.tensor([0.707107, -0.707107])
    assert torch.allclose(group_advantages(torch.tensor([1, 0]), 2, eps=0.0), expected, atol=1e-6)


def test_advantages_carry_no_gradient():
    rewards = REWARDS.clone().requires_grad_(True)
    assert not group_advantages(rewards, 3).requires_grad


def test_rloo_subtracts_the_mean_of_the_others():
    # group 1 = [1, 0, 1]: others' means [0.5, 1.0, 0.5] -> A = [0.5, -1.0, 0.5] (= 3/2 * centred);
    # group 2 = [0, 0, 0] -> 0.  A group of one gets 0.
    assert torch.allclose(rloo_advantages(REWARDS, 3), torch.tensor([0.5, -1.0, 0.5, 0.0, 0.0, 0.0]))
    assert torch.equal(rloo_advantages(torch.tensor([3.0, 4.0]), 1), torch.zeros(2))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: group_advantages(REWARDS, 4), "does not divide"),
        (lambda: rloo_advantages(REWARDS, 4), "does not divide"),
        (lambda: group_advantages(REWARDS, 0), "group_size must be an int >= 1"),
        (lambda: group_advantages(REWARDS.reshape(2, 3), 3), r"\[N\]"),
        (lambda: group_advantages(REWARDS, 3, scale="std"), "unknown advantage scale 'std'.*group, batch, none"),
        (lambda: group_advantages(REWARDS, 3, eps=-1.0), "eps must be a number >= 0"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
