"""Accuracy statistics of an evaluation suite: avg@k, pass@k and their standard errors (pure Python).

A suite of n problems is evaluated with k samples per problem; c_i of problem i's samples are
correct. Then
- avg@k = mean_i c_i / k (the accuracy of one sample, averaged over k per problem), with the
  standard error sd_i(c_i / k) / √n: the problems are the independent units, the k samples of
  one problem are not independent of each other, so the per-problem mean is what varies;
- pass@j (j ≤ k) by the unbiased estimator of Chen et al. (2021): mean_i 1 − C(k − c_i, j) / C(k, j),
  with the same per-problem standard error;
- greedy accuracy is avg@1 of the greedy completion (k = 1, so the SE is √(p(1 − p)/(n − 1)) with
  the sample variance);
- an average over suites is the plain mean of the suite values, its SE √(Σ SE_s²) / S (suites
  independent);
- a difference of two evaluations on the same problems (a run against its base) is paired by
  problem: the SE of mean_i (a_i − b_i) is sd_i(a_i − b_i) / √n, smaller than the unpaired one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean with the sample variance); SE 0 for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_se needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def suite_accuracy(correct: Sequence[int], samples: int) -> tuple[float, float]:
    """(avg@k, SE) from the number of correct samples of each problem, `samples` = k per problem."""
    if samples < 1 or any(not 0 <= c <= samples for c in correct):
        raise ValueError(f"each count must lie in [0, {samples}] and samples must be >= 1")
    return mean_se([c / samples for c in correct])


def suite_pass_at_k(correct: Sequence[int], samples: int, k: int) -> tuple[float, float]:
    """(pass@k, SE) over problems from the per-problem correct counts out of `samples`."""
    return mean_se([pass_at_k(samples, c, k) for c in correct])


def average_of_suites(values: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(mean, SE) of the plain mean of independent suite estimates given as (value, SE) pairs."""
    if not values:
        raise ValueError("average_of_suites needs at least one suite")
    mean = math.fsum(v for v, _ in values) / len(values)
    return mean, math.sqrt(math.fsum(se * se for _, se in values)) / len(values)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(mean of a_i − b_i, its SE) for two evaluations of the same problems, in the same order."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs the same problems on both sides, got {len(a)} and {len(b)}")
    return mean_se([x - y for x, y in zip(a, b)])
