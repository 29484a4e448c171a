"""mtprl.report.stats: t distribution, sign test, paired comparison and correlations against hand values."""

import math

import pytest

from mtprl.report.stats import (
    BETTER,
    NO_PAIRS,
    ONE_SEED,
    WITHIN_NOISE,
    WORSE,
    describe,
    paired_comparison,
    pearson,
    pearson_p,
    sign_test_p,
    spearman,
    t_critical,
    t_two_sided_p,
)


@pytest.mark.parametrize(
    "df, expected",
    # Two-sided 95% critical values of Student's t (standard tables).
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)],
)
def test_t_critical_matches_tables(df, expected):
    assert t_critical(0.95, df) == pytest.approx(expected, abs=1e-4)


def test_t_two_sided_p_closed_forms():
    # df = 1 (Cauchy): P(|T| >= 1) = 1 − (2/π)·atan(1) = 1/2.
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-12)
    # df = 2: P(|T| <= t) = t / √(2 + t²); t = √2 gives √2/2, so p = 1 − √2/2.
    assert t_two_sided_p(math.sqrt(2.0), 2) == pytest.approx(1 - math.sqrt(2) / 2, abs=1e-12)
    # df = 3: P(|T| <= t) = (2/π)(θ + sinθ·cosθ), θ = atan(t/√3); t = √3 gives θ = π/4: (2/π)(π/4 + 1/2).
    assert t_two_sided_p(math.sqrt(3.0), 3) == pytest.approx(1 - (0.5 + 1 / math.pi), abs=1e-12)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert t_two_sided_p(-2.0, 4) == t_two_sided_p(2.0, 4)


def test_sign_test_by_hand():
    # 2 positive of 2: 2·P(X <= 0) = 2·(1/4) = 0.5.
    assert sign_test_p([0.1, 0.2]) == pytest.approx(0.5)
    # 6 positive of 6: 2·(1/64) = 0.03125 (the fewest pairs that can reach p < 0.05).
    assert sign_test_p([1.0] * 6) == pytest.approx(0.03125)
    # 8 positive, 2 negative: 2·(C(10,0)+C(10,1)+C(10,2))/1024 = 2·56/1024 = 0.109375.
    assert sign_test_p([1.0] * 8 + [-1.0] * 2) == pytest.approx(0.109375)
    # 1 positive, 1 negative: 2·(1 + 2)/4 = 1.5, capped at 1. Zeros are dropped: [0, 0.3] is 1 of 1.
    assert sign_test_p([0.1, -0.1]) == 1.0
    assert sign_test_p([0.0, 0.3]) == 1.0
    assert sign_test_p([0.0, 0.0]) == 1.0


def test_describe_uses_sample_std():
    # mean 0.45; sample std of (0.4, 0.5) = 0.1/√2 = 0.0707107.
    assert describe([0.4, 0.5]) == pytest.approx({"mean": 0.45, "std": 0.1 / math.sqrt(2), "n": 2})
    assert describe([0.3]) == {"mean": 0.3, "std": None, "n": 1}
    assert describe([]) == {"mean": None, "std": None, "n": 0}


def test_paired_two_seeds_within_noise():
    # diffs (0.1, 0.2): mean 0.15, sd 0.1/√2, se = sd/√2 = 0.05, half = 12.7062·0.05 = 0.63531.
    out = paired_comparison([0.1, 0.2])
    assert out["mean"] == pytest.approx(0.15)
    assert out["ci_low"] == pytest.approx(0.15 - 0.63531, abs=1e-4)
    assert out["ci_high"] == pytest.approx(0.15 + 0.63531, abs=1e-4)
    assert out["p_sign"] == pytest.approx(0.5)
    assert out["verdict"] == WITHIN_NOISE


def test_paired_three_seeds_better_and_worse():
    # diffs (0.2, 0.25, 0.3): mean 0.25, sd 0.05, se 0.05/√3 = 0.0288675, half = 4.3027·se = 0.124207
    # -> CI [0.1258, 0.3742] above 0: better; sign test 2·(1/8) = 0.25.
    out = paired_comparison([0.2, 0.25, 0.3])
    assert out["ci_low"] == pytest.approx(0.125793, abs=1e-5)
    assert out["ci_high"] == pytest.approx(0.374207, abs=1e-5)
    assert out["p_sign"] == pytest.approx(0.25)
    assert out["verdict"] == BETTER
    assert paired_comparison([-0.2, -0.25, -0.3])["verdict"] == WORSE
    # diffs (0.1, 0.2, 0.3): mean 0.2, sd 0.1, half = 4.3027·0.1/√3 = 0.248414 -> [-0.048, 0.448]: noise.
    assert paired_comparison([0.1, 0.2, 0.3])["verdict"] == WITHIN_NOISE


def test_paired_one_and_zero_pairs():
    one = paired_comparison([0.1])
    assert one["verdict"] == ONE_SEED and one["mean"] == pytest.approx(0.1) and one["ci_low"] is None
    none = paired_comparison([])
    assert none["verdict"] == NO_PAIRS and none["mean"] is None and none["p_sign"] is None


def test_pearson_and_its_p_by_hand():
    # x = (1,2,3), y = (1,3,2): centred (-1,0,1), (-1,1,0); Σxy = 1, Σx² = Σy² = 2 -> r = 0.5.
    # t = 0.5·√(1/0.75) = 1/√3 with df 1: P(|T| <= 1/√3) = (2/π)·atan(1/√3) = 1/3, so p = 2/3.
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson_p(0.5, 3) == pytest.approx(2 / 3, abs=1e-12)
    # With df 2 the mass is t/√(2+t²) = r, so p = 1 − r: r = 0.8 over 4 pairs gives p = 0.2.
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson_p(0.8, 4) == pytest.approx(0.2, abs=1e-12)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert pearson_p(0.9, 2) is None
    with pytest.raises(ValueError, match="paired"):
        pearson([1, 2], [1])


def test_spearman_uses_ranks_with_ties():
    # Monotone but not linear: ranks agree exactly.
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    # y ranks with a tie: (1, 2.5, 2.5, 4) against (1, 2, 3, 4): centred (-1.5,0,0,1.5) vs (-1.5,-.5,.5,1.5):
    # Σxy = 4.5, Σx² = 4.5, Σy² = 5 -> ρ = 4.5/√22.5 = 0.948683.
    assert spearman([1, 2, 3, 4], [5, 7, 7, 9]) == pytest.approx(4.5 / math.sqrt(22.5))
