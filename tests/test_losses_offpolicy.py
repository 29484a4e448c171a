"""Off-policy error of another rollout engine and TIS weights: hand-computed values."""

import math

import pytest
import torch

from mtprl.config import ConfigError
from mtprl.losses import policy_loss
from mtprl.losses.offpolicy import rollout_mismatch, tis_weights
from mtprl.train.config import TrainConfig, checked


def test_mismatch_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]])
    rollout = torch.tensor([[-1.2, -1.0, -0.5], [-3.0, -2.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    m = rollout_mismatch(old, rollout, mask)
    # |Δ| over the 5 valid tokens: 0.2, 1.0, 0, 0, 1.0; ratios e^{0.2}, e^{-1}, 1, 1, e^{1}: two outside [0.5, 2]
    assert m["rollout/mismatch_abs"] == pytest.approx(2.2 / 5)
    assert m["rollout/mismatch_ratio_out"] == pytest.approx(2 / 5)
    assert m["rollout/mismatch_max"] == pytest.approx(1.0)


def test_tis_weights_by_hand():
    old = torch.tensor([[0.0, -1.0, -2.0]])
    rollout = torch.tensor([[-1.0, -1.0, 0.0]])
    w, m = tis_weights(old, rollout, torch.tensor([[True, True, False]]), cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 1.0, 1.0]]))  # e^1 capped at 2; 1; masked -> 1
    assert m["tis/weight_mean"] == pytest.approx(1.5) and m["tis/capped_frac"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="cap"):
        tis_weights(old, rollout, torch.ones(1, 3, dtype=torch.bool), cap=0.0)


def test_tis_as_advantage_factor_equals_weighting_each_token_loss():
    torch.manual_seed(0)
    lp, old = torch.randn(3, 5) * 0.3 - 1, torch.randn(3, 5) * 0.3 - 1
    adv, mask = torch.tensor([1.0, -2.0, 0.5]), torch.rand(3, 5) > 0.2
    w = torch.rand(3, 5) * 2 + 0.1
    weighted, _ = policy_loss(lp, old, adv[:, None] * w, mask, agg="token-mean")
    per_token = []
    for i in range(3):
        for t in range(5):
            if mask[i, t]:
                one = torch.zeros(3, 5, dtype=torch.bool)
                one[i, t] = True
                loss, _ = policy_loss(lp, old, adv, one, agg="token-mean")
                per_token.append(float(w[i, t]) * float(loss))
    assert float(weighted) == pytest.approx(sum(per_token) / len(per_token), rel=1e-5)


def test_config_refuses_tis_without_the_vllm_backend():
    with pytest.raises(ConfigError, match="rollout_backend"):
        checked(TrainConfig(tis_cap=2.0))
    with pytest.raises(ConfigError, match="tis_cap must be 0"):
        checked(TrainConfig(tis_cap=0.5))
    assert math.isclose(checked(TrainConfig()).tis_cap, 0.0)
