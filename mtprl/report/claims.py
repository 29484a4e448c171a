"""The paper's five claims, each judged from the runs by an explicit, fixed criterion.

A verdict is "reproduced", "not reproduced" or "not measurable (missing data)", and always comes
with the numbers it rests on. The criteria (thresholds are the constants below):
 1. occ matches or beats detach. Paired comparison (by seed) of the final headline *average*
    accuracy, occ − detach: reproduced when its verdict is "better" or "within noise" (the 95%
    t-interval reaches 0 or above, i.e. occ is not shown worse). With one common seed: when the
    difference is ≥ 0 (direction only, no test).
 2. ce falls below detach. The same comparison, ce − detach: reproduced when "worse" (the whole
    interval lies below 0). With one seed: when the difference is < 0 (direction only).
 3. Fixed-λ policy loss rises then falls, or ends below detach. (a) On policy's average-accuracy
    curve (mean over seeds at each eval step) the peak lies strictly inside the run and exceeds
    both the first and the last value by more than the noise σ: the mean over steps of the std
    across seeds, or with one seed the std of the step-to-step changes / √2. (b) policy − detach
    as in claim 2. Reproduced when (a) or (b) holds.
 4. Under policy loss the correlation term decays while the penalty persists. Per policy run, the
    means of `exact/0/dot` (⟨g_RL, g_MTP⟩) and `exact/0/g_mtp_sq` (‖g_MTP‖²) over its exact rows in
    the first third of steps (step ≤ T/3, T its last train step) and the last third (step > 2T/3),
    averaged over runs. Reproduced when dot_first > 0, dot_last < DECAY·dot_first and
    pen_last ≥ PERSIST·pen_first.
 5. The log-prob proxy tracks the exact slope. Pearson r between `exact/{k}/proxy_c_hat` and
    `exact/{k}/slope` over all exact rows, all heads, of occ and occ-exact runs: reproduced when
    r ≥ MIN_R and its two-sided p < ALPHA (at least 3 rows). Spearman's ρ is reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mtprl.report.keys import AVG, eval_value, head_indices
from mtprl.report.load import Run, number
from mtprl.report.series import Series, align
from mtprl.report.stats import BETTER, WITHIN_NOISE, WORSE, pearson, pearson_p, spearman

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_MEASURABLE = "not measurable (missing data)"
OCC_REGIMES = ("occ", "occ-exact")
DECAY = 0.5  # claim 4: the late correlation term must fall below half its early value
PERSIST = 0.5  # claim 4: the late penalty must keep at least half its early value
MIN_R = 0.5  # claim 5: minimum Pearson r
ALPHA = 0.05  # claim 5: significance level of r


def _claim(number_: int, text: str, criterion: str, verdict: str, explanation: str,
           evidence: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": number_, "claim": text, "criterion": criterion, "verdict": verdict,
            "explanation": explanation, "evidence": evidence or {}}


def _avg_comparison(summary: dict[str, Any], regime: str) -> tuple[dict[str, Any] | None, str]:
    """The paired comparison regime − reference on the headline average, or why there is none."""
    reference, headline = summary["reference"], summary["headline"]
    if headline is None:
        return None, "no run has eval accuracy"
    for name in (regime, reference):
        if name not in summary["regimes"]:
            return None, f"no {name} run"
    comparison = summary["paired"][headline][regime][AVG]
    if comparison["n"] == 0:
        return None, f"no seed with a final {headline} average in both {regime} and {reference}"
    return comparison, ""


def describe_comparison(comparison: dict[str, Any]) -> str:
    """'+0.150 over 2 seeds, 95% CI [-0.485, +0.785], sign-test p = 0.500: within noise'."""
    if comparison["n"] == 1:
        return f"{comparison['mean']:+.3f} ({comparison['verdict']})"
    return (f"{comparison['mean']:+.3f} over {comparison['n']} seeds, 95% CI [{comparison['ci_low']:+.3f}, "
            f"{comparison['ci_high']:+.3f}], sign-test p = {comparison['p_sign']:.3f}: {comparison['verdict']}")


def _shown_worse(comparison: dict[str, Any]) -> bool:
    """'worse' by the interval; with one seed, a negative difference (direction only)."""
    return comparison["mean"] < 0 if comparison["n"] == 1 else comparison["verdict"] == WORSE


def _not_shown_worse(comparison: dict[str, Any]) -> bool:
    """'better' or 'within noise' by the interval; with one seed, a difference ≥ 0 (direction only)."""
    return comparison["mean"] >= 0 if comparison["n"] == 1 else comparison["verdict"] in (BETTER, WITHIN_NOISE)


def _versus_reference(summary: dict[str, Any], number_: int, regime: str, text: str,
                      want_worse: bool) -> dict[str, Any]:
    """Claims 1 and 2: regime − reference on the headline average, want 'worse' or 'not worse'."""
    if want_worse:
        criterion = (f"paired {regime} − {summary['reference']} on the final average accuracy: the 95% "
                     "t-interval lies below 0 (one seed: the difference is < 0, no test)")
    else:
        criterion = (f"paired {regime} − {summary['reference']} on the final average accuracy: 'better' or "
                     "'within noise', i.e. not shown worse (one seed: the difference is ≥ 0, no test)")
    comparison, reason = _avg_comparison(summary, regime)
    if comparison is None:
        return _claim(number_, text, criterion, NOT_MEASURABLE, reason)
    ok = _shown_worse(comparison) if want_worse else _not_shown_worse(comparison)
    explanation = (f"{regime} − {summary['reference']} ({summary['headline']} average): "
                   f"{describe_comparison(comparison)}")
    if not want_worse and comparison["verdict"] == WITHIN_NOISE:
        explanation += (f"; 'matches' means only 'not shown worse': the interval still allows "
                        f"{comparison['ci_low']:+.3f}")
    return _claim(number_, text, criterion, REPRODUCED if ok else NOT_REPRODUCED, explanation, comparison)


def _noise(series: Series) -> float:
    """σ of claim 3: mean std across seeds, or (one seed) std of step-to-step changes / √2."""
    std = series.std
    if np.isfinite(std).any():
        return float(np.nanmean(std))
    changes = np.diff(series.mean)  # [S-1]
    return float(np.std(changes, ddof=1) / np.sqrt(2.0)) if len(changes) > 1 else 0.0


def _rise_then_fall(runs: Sequence[Run], summary: dict[str, Any]) -> dict[str, Any] | None:
    """Part (a) of claim 3 on the average-accuracy curve; None with fewer than 3 eval steps."""
    headline, suites = summary["headline"], summary["suites"]
    series = align(runs, "eval", lambda row: eval_value(row, AVG, headline, suites)) if headline else None
    if series is None or len(series.steps) < 3:
        return None
    curve, noise = series.mean, _noise(series)  # [S], float
    peak = int(np.argmax(curve))
    ok = 0 < peak < len(curve) - 1 and curve[peak] - curve[0] > noise and curve[peak] - curve[-1] > noise
    return {"first": float(curve[0]), "peak": float(curve[peak]), "peak_step": int(series.steps[peak]),
            "last": float(curve[-1]), "noise": noise, "eval_steps": len(curve), "rise_then_fall": bool(ok)}


def claim_policy_rise_fall(groups: dict[str, list[Run]], summary: dict[str, Any]) -> dict[str, Any]:
    text = "fixed-λ policy loss rises then falls, or ends below detach"
    criterion = ("(a) the policy average-accuracy curve peaks strictly inside the run, above both its first and "
                 "last value by more than the noise σ; or (b) policy − detach is 'worse' as in claim 2")
    curve = _rise_then_fall(groups["policy"], summary) if "policy" in groups else None
    comparison, reason = _avg_comparison(summary, "policy")
    below = None if comparison is None else _shown_worse(comparison)
    if curve is None and below is None:
        why = reason if "policy" not in groups else f"fewer than 3 policy eval steps, and {reason}"
        return _claim(3, text, criterion, NOT_MEASURABLE, why)
    parts = []
    if curve is None:
        parts.append("(a) not measurable: fewer than 3 policy eval steps")
    else:
        parts.append(f"(a) first {curve['first']:.3f}, peak {curve['peak']:.3f} at step {curve['peak_step']}, "
                     f"last {curve['last']:.3f}, noise σ {curve['noise']:.3f}: "
                     f"{'rises then falls' if curve['rise_then_fall'] else 'no rise-then-fall beyond noise'}")
    if comparison is None:
        parts.append(f"(b) not measurable: {reason}")
    else:
        parts.append(f"(b) policy − {summary['reference']}: {describe_comparison(comparison)}")
    ok = bool(curve and curve["rise_then_fall"]) or bool(below)
    evidence = {"curve": curve, "versus_reference": comparison, "ends_below": below}
    return _claim(3, text, criterion, REPRODUCED if ok else NOT_REPRODUCED, "; ".join(parts), evidence)


def _thirds(run: Run, head: int = 0) -> dict[str, Any] | None:
    """Claim 4 for one run: means of dot and g_mtp_sq over the first and last third of steps."""
    if not run.train:
        return None
    last_step = max(row["step"] for row in run.train)
    dot_key, pen_key = f"exact/{head}/dot", f"exact/{head}/g_mtp_sq"
    rows = [(row["step"], number(row, dot_key), number(row, pen_key)) for row in run.train]
    rows = [(s, d, p) for s, d, p in rows if d is not None and p is not None]
    first = [(d, p) for s, d, p in rows if s <= last_step / 3]
    last = [(d, p) for s, d, p in rows if s > 2 * last_step / 3]
    if not first or not last:
        return None
    return {"seed": run.seed, "rows_first": len(first), "rows_last": len(last),
            "dot_first": float(np.mean([d for d, _ in first])), "dot_last": float(np.mean([d for d, _ in last])),
            "pen_first": float(np.mean([p for _, p in first])), "pen_last": float(np.mean([p for _, p in last]))}


def claim_policy_terms(groups: dict[str, list[Run]]) -> dict[str, Any]:
    text = "under fixed-λ policy loss the correlation term decays while the penalty persists"
    criterion = (f"policy runs, head 0, first vs last third of steps (averaged over runs): dot_first > 0, "
                 f"dot_last < {DECAY}·dot_first, and g_mtp_sq_last ≥ {PERSIST}·g_mtp_sq_first")
    per_run = [t for t in (_thirds(run) for run in groups.get("policy", [])) if t is not None]
    if not per_run:
        return _claim(4, text, criterion, NOT_MEASURABLE,
                      "no policy run with exact/0/dot and exact/0/g_mtp_sq rows in both the first and last third")
    keys = ("dot_first", "dot_last", "pen_first", "pen_last")
    mean = {key: float(np.mean([t[key] for t in per_run])) for key in keys}
    decays = mean["dot_first"] > 0 and mean["dot_last"] < DECAY * mean["dot_first"]
    persists = mean["pen_last"] >= PERSIST * mean["pen_first"]
    explanation = (f"over {len(per_run)} run(s): ⟨g_RL, g_MTP⟩ {mean['dot_first']:.4g} → {mean['dot_last']:.4g} "
                   f"({'decays' if decays else 'does not decay'}), ‖g_MTP‖² {mean['pen_first']:.4g} → "
                   f"{mean['pen_last']:.4g} ({'persists' if persists else 'does not persist'})")
    verdict = REPRODUCED if decays and persists else NOT_REPRODUCED
    return _claim(4, text, criterion, verdict, explanation, {"mean": mean, "runs": per_run})


def proxy_pairs(groups: dict[str, list[Run]]) -> dict[str, tuple[list[float], list[float]]]:
    """regime -> (exact slopes, proxy ĉ) over the exact rows, all heads, of the OCC regimes."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for regime in OCC_REGIMES:
        slopes: list[float] = []
        proxies: list[float] = []
        for run in groups.get(regime, []):
            for head in head_indices(run.train, "exact", "slope"):
                for row in run.train:
                    slope, proxy = number(row, f"exact/{head}/slope"), number(row, f"exact/{head}/proxy_c_hat")
                    if slope is not None and proxy is not None:
                        slopes.append(slope)
                        proxies.append(proxy)
        if slopes:
            out[regime] = (slopes, proxies)
    return out


def claim_proxy_tracks(groups: dict[str, list[Run]]) -> dict[str, Any]:
    text = "the log-prob proxy ĉ tracks the exact slope ⟨g_RL, g_MTP⟩ / ‖g_MTP‖²"
    criterion = (f"Pearson r of proxy_c_hat vs slope over all exact rows of occ/occ-exact runs: r ≥ {MIN_R} "
                 f"and two-sided p < {ALPHA} (at least 3 rows)")
    pairs = proxy_pairs(groups)
    slopes = [v for s, _ in pairs.values() for v in s]
    proxies = [v for _, p in pairs.values() for v in p]
    r = pearson(slopes, proxies) if len(slopes) >= 3 else None
    if r is None:
        reason = (f"{len(slopes)} exact row(s) with both proxy_c_hat and slope in occ/occ-exact runs"
                  if len(slopes) < 3 else "the proxy or the exact slope is constant")
        return _claim(5, text, criterion, NOT_MEASURABLE, reason, {"n": len(slopes)})
    p = pearson_p(r, len(slopes))
    rho = spearman(slopes, proxies)
    ok = r >= MIN_R and p is not None and p < ALPHA
    rho_text = "undefined" if rho is None else f"{rho:.3f}"
    explanation = f"r = {r:.3f} (p = {p:.3g}) over {len(slopes)} exact rows; Spearman ρ = {rho_text}"
    return _claim(5, text, criterion, REPRODUCED if ok else NOT_REPRODUCED, explanation,
                  {"n": len(slopes), "pearson_r": r, "p": p, "spearman_rho": rho})


def evaluate_claims(groups: dict[str, list[Run]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Claims (1)–(5) in order; `summary` needs reference, regimes, headline, suites and paired."""
    return [
        _versus_reference(summary, 1, "occ", "occ matches or beats detach", want_worse=False),
        _versus_reference(summary, 2, "ce", "ce falls below detach", want_worse=True),
        claim_policy_rise_fall(groups, summary),
        claim_policy_terms(groups),
        claim_proxy_tracks(groups),
    ]
