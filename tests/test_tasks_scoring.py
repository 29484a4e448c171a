"""Accuracy statistics of a suite against hand-computed values."""

import math

import pytest

from mtprl.tasks.scoring import (average_of_suites, mean_se, paired_difference, pass_at_k, suite_accuracy,
                                 suite_pass_at_k)


def test_pass_at_k_by_hand():
    # n = 4 samples, c = 1 correct: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2; pass@4 = 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0
    # n = 16, c = 2, k = 4: 1 - C(14,4)/C(16,4) = 1 - 1001/1820 = 0.45
    assert pass_at_k(16, 2, 4) == pytest.approx(1 - 1001 / 1820)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_suite_accuracy_uses_problems_as_units():
    # 3 problems, 4 samples: per-problem accuracies 1, 0.5, 0 -> mean 0.5, sd 0.5, SE 0.5/sqrt(3)
    acc, se = suite_accuracy([4, 2, 0], 4)
    assert acc == pytest.approx(0.5) and se == pytest.approx(0.5 / math.sqrt(3))
    # greedy (one sample): 0/1 outcomes 1, 1, 0, 0 -> mean 0.5, sample sd sqrt(1/3), SE sqrt(1/3)/2
    acc, se = suite_accuracy([1, 1, 0, 0], 1)
    assert acc == 0.5 and se == pytest.approx(math.sqrt(1 / 3) / 2)
    p, se = suite_pass_at_k([4, 2, 0], 4, 4)
    assert p == pytest.approx(2 / 3) and se == pytest.approx(mean_se([1.0, 1.0, 0.0])[1])


def test_average_of_suites_and_paired_difference():
    mean, se = average_of_suites([(0.2, 0.03), (0.6, 0.04)])
    assert mean == pytest.approx(0.4) and se == pytest.approx(0.05 / 2)
    # paired: differences 0.5, 0.5, 0.0 -> mean 1/3, sd sqrt(1/12), SE sqrt(1/12)/sqrt(3) = 1/6
    diff, se = paired_difference([1.0, 0.5, 0.25], [0.5, 0.0, 0.25])
    assert diff == pytest.approx(1 / 3) and se == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="same problems"):
        paired_difference([1.0], [1.0, 0.0])
