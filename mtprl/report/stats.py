"""Small-sample statistics for comparing runs across seeds, in pure Python (no SciPy).

- `describe`: mean, sample standard deviation (ddof = 1; None for one value) and n.
- `paired_comparison`: per-seed differences d_i = regime_i − reference_i; the mean difference
  with a two-sided 95% Student-t interval mean ± t_{0.975, n−1} · sd / √n, and an exact
  two-sided sign test (zero differences dropped). Verdict rule: "better" when the whole interval
  lies above 0, "worse" when it lies below 0, otherwise "within noise"; with one pair "one seed:
  no test". The sign test is reported beside the interval as a distribution-free check; it
  cannot reach p < 0.05 with fewer than 6 pairs, so it does not decide the verdict. When all
  differences are equal the interval has zero width and the verdict follows their sign.
- Student-t probabilities use the exact finite series for integer degrees of freedom
  (Abramowitz & Stegun 26.7.3–26.7.4); quantiles invert it by bisection.
- `pearson` with the usual t-test of r = 0 (df = n − 2), and `spearman` (ranks, ties averaged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

BETTER = "better"
WORSE = "worse"
WITHIN_NOISE = "within noise"
ONE_SEED = "one seed: no test"
NO_PAIRS = "no common seed"
CONFIDENCE = 0.95


def describe(values: Sequence[float]) -> dict[str, Any]:
    """{"mean", "std", "n"}: mean and sample std (ddof = 1) of `values`; None where undefined."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def _t_mass_theta(theta: float, df: int) -> float:
    """P(|T| ≤ √df·tan θ) for Student's t with integer df ≥ 1 (A&S 26.7.3–4, exact)."""
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        series, term = 0.0, math.cos(theta)
        if df > 1:
            series = term  # cos θ + (2/3) cos³θ + ... + (2·4···(df−3))/(1·3···(df−2)) cos^(df−2) θ
            for j in range(1, (df - 1) // 2):
                term *= c2 * (2 * j) / (2 * j + 1)
                series += term
        return 2.0 / math.pi * (theta + math.sin(theta) * series)
    series, term = 1.0, 1.0  # 1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + ... up to cos^(df−2) θ
    for j in range(1, df // 2):
        term *= c2 * (2 * j - 1) / (2 * j)
        series += term
    return math.sin(theta) * series


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value P(|T| ≥ |t|) for Student's t with integer df ≥ 1."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    return max(0.0, 1.0 - _t_mass_theta(math.atan(abs(t) / math.sqrt(df)), df))


def t_critical(confidence: float, df: int) -> float:
    """t with P(|T| ≤ t) = confidence, e.g. t_critical(0.95, 1) ≈ 12.706."""
    if df < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need df >= 1 and 0 < confidence < 1, got df={df}, confidence={confidence}")
    lo, hi = 0.0, math.pi / 2  # the mass grows monotonically with θ ∈ [0, π/2)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_mass_theta(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
    return math.sqrt(df) * math.tan(0.5 * (lo + hi))


def sign_test_p(diffs: Sequence[float]) -> float:
    """Exact two-sided sign test: 2 · P(Binomial(n, ½) ≤ min(#pos, #neg)), capped at 1; zeros dropped."""
    pos = sum(1 for d in diffs if d > 0)
    neg = sum(1 for d in diffs if d < 0)
    n = pos + neg
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(pos, neg) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired_comparison(diffs: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean of per-seed differences, its t-interval, the sign-test p and the verdict (module docstring)."""
    n = len(diffs)
    desc = describe(diffs)
    out = {"n": n, "mean": desc["mean"], "std": desc["std"], "ci_low": None, "ci_high": None,
           "p_sign": sign_test_p(diffs) if n else None, "verdict": NO_PAIRS if n == 0 else ONE_SEED}
    if n < 2:
        return out
    half = t_critical(confidence, n - 1) * desc["std"] / math.sqrt(n)
    low, high = desc["mean"] - half, desc["mean"] + half
    out.update(ci_low=low, ci_high=high, verdict=BETTER if low > 0 else WORSE if high < 0 else WITHIN_NOISE)
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of paired samples; None with fewer than 2 pairs or a constant input."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"pearson needs paired samples, got {n} and {len(y)} values")
    if n < 2:
        return None
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    if sxx == 0.0 or syy == 0.0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def pearson_p(r: float, n: int) -> float | None:
    """Two-sided p of r = 0 from t = r·√((n−2)/(1−r²)) with n − 2 df; None for n < 3."""
    if n < 3:
        return None
    if abs(r) >= 1.0:
        return 0.0
    return t_two_sided_p(r * math.sqrt((n - 2) / (1.0 - r * r)), n - 2)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson on ranks); None where Pearson is undefined."""
    return pearson(_ranks(x), _ranks(y))
