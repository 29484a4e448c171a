"""The paper's five claims, each judged from the runs by an explicit, fixed criterion.

A verdict is "reproduced", "not reproduced" or "not measurable (missing data)", and always comes
with the numbers it rests on. The criteria (thresholds are the constants below):
 1. occ matches or beats detach. Paired comparison (by seed) of the final headline *average*
    accuracy, occ − detach: reproduced when its verdict is "better" or "within noise" (the 95%
    t-interval reaches 0 or above, i.e. occ is not shown worse). With one common seed there is no
    interval: the verdict is "not tested (one seed)", with the difference as its number.
 2. ce falls below detach. The same comparison, ce − detach: reproduced when "worse" (the whole
    interval lies below 0). With one seed: "not tested (one seed)".
 3. Fixed-λ policy loss rises then falls, or ends below detach. (a) On policy's average-accuracy
    curve (mean over seeds at each eval step) the peak lies strictly inside the run and exceeds
    both the first and the last value by more than the noise σ: the mean over steps of the std
    across seeds, or with one seed the std of the step-to-step changes / √2. (b) policy − detach
    as in claim 2. Reproduced when (a) or (b) holds; with one seed and no (a), "not tested (one seed)".
 4. Under policy loss the correlation term decays while the penalty persists. Per policy run, the
    means of the held-out `heldout/0/dot` (⟨g_RL, g_MTP⟩ from disjoint halves of the batch) and
    `heldout/0/g_mtp_sq` (‖g_MTP‖², split-half) over its rows in the first third of steps (step ≤ T/3,
    T its last train step) and the last third (step > 2T/3), averaged over runs. Runs logged before the
    held-out terms existed fall back to the same-batch `exact/0/dot` and `exact/0/g_mtp_sq` (biased by
    tr Cov(ĝ_RL, ĝ_MTP)), and the explanation says which was used. Reproduced when dot_first > 0,
    dot_last < DECAY·dot_first and pen_last ≥ PERSIST·pen_first. The AdamW-preconditioned pair
    (pdot, pg_mtp_sq) is reported beside it.
 5. The log-prob proxy tracks the effect of λ. With probe rows (`mtprl probe`, any regime's runs,
    pooled): sign agreement of the proxy ĉ (the runs' OCC estimator) with the measured dJ/dλ and
    Spearman ρ, with bootstrap 95% intervals: reproduced when the sign-agreement interval lies above
    ½ and the ρ interval above 0 (at least MIN_PROBE_ROWS rows). The other predictors' agreement is
    in the evidence. Without probe rows, the older proxy-vs-exact-slope test: Pearson r between
    `exact/{k}/proxy_c_hat` and `exact/{k}/slope` over all exact rows, all heads, of occ and occ-exact
    runs: reproduced when r ≥ MIN_R and its two-sided p < ALPHA (at least 3 rows).
λ₀ arms: a claim about a regime that was swept (`REGIME@λ₀` groups, no plain `REGIME` group) is judged
on its arm at the base λ₀ (`summary["base_coef"]`), and says so. Claims (1)–(4) are also judged, by the
same criteria, on every other λ₀ arm of their regime (`evaluate_arm_claims`, the report's "other λ₀"
list), so a sweep that left out the base λ₀ still gets verdicts, each naming its λ₀.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mtprl.report.keys import AVG, eval_value, head_indices
from mtprl.report.load import Run, arm_label, base_regime, number
from mtprl.report.probe import agreement
from mtprl.report.series import Series, align
from mtprl.report.stats import BETTER, WITHIN_NOISE, WORSE, pearson, pearson_p, spearman

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_MEASURABLE = "not measurable (missing data)"
NOT_TESTED = "not tested (one seed)"  # a paired comparison of one seed has a direction but no interval
OCC_REGIMES = ("occ", "occ-exact")
CLAIM_REGIMES = ("occ", "ce", "policy")  # the regimes claims (1)/(2)/(3)-(4) are about
DECAY = 0.5  # claim 4: the late correlation term must fall below half its early value
PERSIST = 0.5  # claim 4: the late penalty must keep at least half its early value
MIN_R = 0.5  # claim 5: minimum Pearson r
ALPHA = 0.05  # claim 5: significance level of r
MIN_PROBE_ROWS = 3  # claim 5 with probe rows: fewest rows for a verdict


def _claim(number_: int, text: str, criterion: str, verdict: str, explanation: str,
           evidence: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": number_, "claim": text, "criterion": criterion, "verdict": verdict,
            "explanation": explanation, "evidence": evidence or {}}


def group_name(groups: dict[str, list[Run]], regime: str, base_coef: float | None) -> str:
    """The group a claim about `regime` is judged on: `regime` itself, else its λ₀ arm at the base λ₀."""
    if regime in groups or base_coef is None:
        return regime
    arm = arm_label(regime, base_coef)
    return arm if arm in groups else regime


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
    """'worse' by the interval (never with one seed: no interval)."""
    return comparison["n"] > 1 and comparison["verdict"] == WORSE


def _not_shown_worse(comparison: dict[str, Any]) -> bool:
    """'better' or 'within noise' by the interval (never with one seed: no interval)."""
    return comparison["n"] > 1 and comparison["verdict"] in (BETTER, WITHIN_NOISE)


def _versus_reference(summary: dict[str, Any], number_: int, regime: str, text: str,
                      want_worse: bool) -> dict[str, Any]:
    """Claims 1 and 2: regime − reference on the headline average, want 'worse' or 'not worse'."""
    if want_worse:
        criterion = (f"paired {regime} − {summary['reference']} on the final average accuracy: the 95% "
                     "t-interval lies below 0 (one seed: not tested)")
    else:
        criterion = (f"paired {regime} − {summary['reference']} on the final average accuracy: 'better' or "
                     "'within noise', i.e. not shown worse (one seed: not tested)")
    comparison, reason = _avg_comparison(summary, regime)
    if comparison is None:
        return _claim(number_, text, criterion, NOT_MEASURABLE, reason)
    ok = _shown_worse(comparison) if want_worse else _not_shown_worse(comparison)
    verdict = NOT_TESTED if comparison["n"] == 1 else REPRODUCED if ok else NOT_REPRODUCED
    explanation = (f"{regime} − {summary['reference']} ({summary['headline']} average): "
                   f"{describe_comparison(comparison)}")
    if not want_worse and comparison["verdict"] == WITHIN_NOISE:
        explanation += (f"; 'matches' means only 'not shown worse': the interval still allows "
                        f"{comparison['ci_low']:+.3f}")
    return _claim(number_, text, criterion, verdict, explanation, comparison)


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


def claim_policy_rise_fall(groups: dict[str, list[Run]], summary: dict[str, Any], policy: str = "policy") -> dict[str, Any]:
    text = "fixed-λ policy loss rises then falls, or ends below detach"
    criterion = (f"(a) the {policy} average-accuracy curve peaks strictly inside the run, above both its first and "
                 f"last value by more than the noise σ; or (b) {policy} − detach is 'worse' as in claim 2")
    curve = _rise_then_fall(groups[policy], summary) if policy in groups else None
    comparison, reason = _avg_comparison(summary, policy)
    below = None if comparison is None else _shown_worse(comparison)
    if curve is None and below is None:
        why = reason if policy not in groups else f"fewer than 3 {policy} eval steps, and {reason}"
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
        parts.append(f"(b) {policy} − {summary['reference']}: {describe_comparison(comparison)}")
    ok = bool(curve and curve["rise_then_fall"]) or bool(below)
    untested = not ok and comparison is not None and comparison["n"] == 1  # (b) had no interval to fail
    verdict = REPRODUCED if ok else NOT_TESTED if untested else NOT_REPRODUCED
    evidence = {"curve": curve, "versus_reference": comparison, "ends_below": below}
    return _claim(3, text, criterion, verdict, "; ".join(parts), evidence)


HELDOUT_KEYS = ("heldout/{head}/dot", "heldout/{head}/g_mtp_sq")
SAME_BATCH_KEYS = ("exact/{head}/dot", "exact/{head}/g_mtp_sq")
PRECONDITIONED_KEYS = ("heldout/{head}/pdot", "heldout/{head}/pg_mtp_sq")


def _thirds(run: Run, keys: tuple[str, str] = SAME_BATCH_KEYS, head: int = 0) -> dict[str, Any] | None:
    """Claim 4 for one run: means of the correlation term and the penalty over the first and last third of steps."""
    if not run.train:
        return None
    last_step = max(row["step"] for row in run.train)
    dot_key, pen_key = (key.format(head=head) for key in keys)
    rows = [(row["step"], number(row, dot_key), number(row, pen_key)) for row in run.train]
    rows = [(s, d, p) for s, d, p in rows if d is not None and p is not None]
    first = [(d, p) for s, d, p in rows if s <= last_step / 3]
    last = [(d, p) for s, d, p in rows if s > 2 * last_step / 3]
    if not first or not last:
        return None
    return {"seed": run.seed, "rows_first": len(first), "rows_last": len(last),
            "dot_first": float(np.mean([d for d, _ in first])), "dot_last": float(np.mean([d for d, _ in last])),
            "pen_first": float(np.mean([p for _, p in first])), "pen_last": float(np.mean([p for _, p in last]))}


def _mean_thirds(per_run: list[dict[str, Any]]) -> dict[str, float]:
    return {key: float(np.mean([t[key] for t in per_run])) for key in ("dot_first", "dot_last", "pen_first", "pen_last")}


def claim_policy_terms(groups: dict[str, list[Run]], policy: str = "policy") -> dict[str, Any]:
    text = "under fixed-λ policy loss the correlation term decays while the penalty persists"
    criterion = (f"{policy} runs, head 0, first vs last third of steps (averaged over runs), held-out terms "
                 f"(same-batch for runs without them): dot_first > 0, dot_last < {DECAY}·dot_first, and "
                 f"g_mtp_sq_last ≥ {PERSIST}·g_mtp_sq_first")
    runs = groups.get(policy, [])
    per_run = [t for t in (_thirds(run, HELDOUT_KEYS) for run in runs) if t is not None]
    source = "held-out (disjoint halves of each batch)"
    if not per_run:
        per_run = [t for t in (_thirds(run, SAME_BATCH_KEYS) for run in runs) if t is not None]
        source = "same-batch (no held-out rows; biased by tr Cov(ĝ_RL, ĝ_MTP))"
    if not per_run:
        return _claim(4, text, criterion, NOT_MEASURABLE,
                      f"no {policy} run with heldout/0/dot and heldout/0/g_mtp_sq (or exact/0/...) rows in both the "
                      "first and last third")
    mean = _mean_thirds(per_run)
    decays = mean["dot_first"] > 0 and mean["dot_last"] < DECAY * mean["dot_first"]
    persists = mean["pen_last"] >= PERSIST * mean["pen_first"]
    explanation = (f"{source}, over {len(per_run)} run(s): ⟨g_RL, g_MTP⟩ {mean['dot_first']:.4g} → "
                   f"{mean['dot_last']:.4g} ({'decays' if decays else 'does not decay'}), ‖g_MTP‖² "
                   f"{mean['pen_first']:.4g} → {mean['pen_last']:.4g} ({'persists' if persists else 'does not persist'})")
    preconditioned = [t for t in (_thirds(run, PRECONDITIONED_KEYS) for run in runs) if t is not None]
    evidence = {"source": source, "mean": mean, "runs": per_run}
    if preconditioned:
        pre = _mean_thirds(preconditioned)
        evidence["preconditioned"] = pre
        explanation += (f"; AdamW geometry: ⟨g_RL, P g_MTP⟩ {pre['dot_first']:.4g} → {pre['dot_last']:.4g}, "
                        f"‖P g_MTP‖² {pre['pen_first']:.4g} → {pre['pen_last']:.4g}")
    verdict = REPRODUCED if decays and persists else NOT_REPRODUCED
    return _claim(4, text, criterion, verdict, explanation, evidence)


def proxy_pairs(groups: dict[str, list[Run]]) -> dict[str, tuple[list[float], list[float]]]:
    """regime (or λ₀ arm) -> (exact slopes, proxy ĉ) over the exact rows, all heads, of the OCC regimes."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for regime in [name for name in groups if base_regime(name) in OCC_REGIMES]:
        slopes: list[float] = []
        proxies: list[float] = []
        for run in groups[regime]:
            for head in head_indices(run.train, "exact", "slope"):
                for row in run.train:
                    slope, proxy = number(row, f"exact/{head}/slope"), number(row, f"exact/{head}/proxy_c_hat")
                    if slope is not None and proxy is not None:
                        slopes.append(slope)
                        proxies.append(proxy)
        if slopes:
            out[regime] = (slopes, proxies)
    return out


def _proxy_key(runs: list[Run]) -> str:
    """The probe row's proxy key of the OCC estimator the runs used (the paper's mean-ratio unless all chose the other)."""
    estimators = {run.config.get("occ_estimator", "mean-ratio") for run in runs}
    return "proxy_ratio_of_sums" if estimators == {"ratio-of-sums"} else "proxy_mean_ratio"


def claim_proxy_tracks_effect(groups: dict[str, list[Run]]) -> dict[str, Any] | None:
    """Claim 5 from the finite-difference probe rows of all runs; None when no run was probed."""
    runs = [run for g in groups.values() for run in g if run.probe]
    if not runs:
        return None
    rows = [row for run in runs for row in run.probe]
    key = _proxy_key(runs)
    text = "the log-prob proxy ĉ tracks the effect of λ on the objective (finite-difference probe)"
    criterion = (f"{key} vs the measured dJ/dλ over the probe rows of all probed runs: the bootstrap 95% interval "
                 f"of the sign agreement lies above 0.5 and that of Spearman ρ above 0 (at least {MIN_PROBE_ROWS} rows)")
    stats = agreement(rows)
    mine = stats.get(key)
    if mine is None or mine["n"] < MIN_PROBE_ROWS or mine["sign_ci"][0] is None or mine["spearman_ci"][0] is None:
        return _claim(5, text, criterion, NOT_MEASURABLE,
                      f"{len(rows)} probe row(s) from {len(runs)} run(s): too few, or a constant predictor or effect",
                      {"agreement": stats, "rows": len(rows)})
    ok = mine["sign_ci"][0] > 0.5 and mine["spearman_ci"][0] > 0
    others = "; ".join(f"{s['label']} {s['sign_agreement']:.2f} / ρ {s['spearman']:.2f}" for k, s in stats.items()
                       if k != key and s["sign_agreement"] is not None and s["spearman"] is not None)
    explanation = (f"{mine['n']} probe rows from {len(runs)} run(s): sign agreement {mine['sign_agreement']:.2f} "
                   f"[{mine['sign_ci'][0]:.2f}, {mine['sign_ci'][1]:.2f}], Spearman ρ {mine['spearman']:.2f} "
                   f"[{mine['spearman_ci'][0]:.2f}, {mine['spearman_ci'][1]:.2f}]"
                   + (f"; other predictors (sign agreement / ρ): {others}" if others else ""))
    return _claim(5, text, criterion, REPRODUCED if ok else NOT_REPRODUCED, explanation,
                  {"agreement": stats, "rows": len(rows), "predictor": key})


def claim_proxy_tracks(groups: dict[str, list[Run]]) -> dict[str, Any]:
    probed = claim_proxy_tracks_effect(groups)
    if probed is not None:
        return probed
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
    base = summary.get("base_coef")
    occ, ce, policy = (group_name(groups, name, base) for name in CLAIM_REGIMES)
    return [
        _versus_reference(summary, 1, occ, "occ matches or beats detach", want_worse=False),
        _versus_reference(summary, 2, ce, "ce falls below detach", want_worse=True),
        claim_policy_rise_fall(groups, summary, policy),
        claim_policy_terms(groups, policy),
        claim_proxy_tracks(groups),
    ]


def _arms_of(groups: dict[str, list[Run]], regime: str) -> list[str]:
    """The `REGIME@λ₀` groups of `regime`, by λ₀."""
    arms = [name for name in groups if base_regime(name) == regime and name != regime]
    return sorted(arms, key=lambda name: float(name.partition("@")[2]))


def evaluate_arm_claims(groups: dict[str, list[Run]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Claims (1)–(4) on every λ₀ arm of occ / ce / policy other than the one `evaluate_claims` judged,
    each with `lambda0` and its λ₀ in the claim's text; by claim, then λ₀."""
    base = summary.get("base_coef")
    judges = (  # the claims about each of CLAIM_REGIMES, as evaluate_claims builds them
        lambda arm: [_versus_reference(summary, 1, arm, "occ matches or beats detach", want_worse=False)],
        lambda arm: [_versus_reference(summary, 2, arm, "ce falls below detach", want_worse=True)],
        lambda arm: [claim_policy_rise_fall(groups, summary, arm), claim_policy_terms(groups, arm)],
    )
    out = []
    for regime, judge in zip(CLAIM_REGIMES, judges):
        judged = group_name(groups, regime, base)
        for arm in _arms_of(groups, regime):
            if arm == judged:
                continue
            for claim in judge(arm):
                claim["lambda0"] = float(arm.partition("@")[2])
                claim["claim"] += f", at λ₀ = {arm.partition('@')[2]} ({arm})"
                out.append(claim)
    return sorted(out, key=lambda c: (c["id"], c["lambda0"]))
