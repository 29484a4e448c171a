"""The report's numbers as one JSON-ready dict: runs, final-accuracy tables, paired comparisons, claims.

Layout of the dict returned by `summarize` (and written to summary.json):
  runs       one entry per run: path, regime, seed, finished, final_step, steps, wall_time, ...
  regimes    regime names in display order (a swept regime's runs as λ₀ arms REGIME@λ₀, see
             load.label_arms); base_coef the base λ₀; suites, metrics (headline first), headline
  accuracy   {metric: {regime: {column: stat}}}, columns = suites + ["avg"]
  extras     {regime: {"eval/mtp_accept" | "eval/mtp_top1" | "wall_time": stat}}
  paired     {metric: {regime: {column: comparison}}} against `detach`, matched by seed
  paired_problems {metric: {regime: {column: {"diff", "se", "seeds"}}}}: the same difference measured
             problem by problem on the runs' final evaluations (mean over common seeds; evaluation
             noise only, so it is meaningful with one seed, where `paired` has no test)
  base       the shared base evaluation (model, weights hash, its eval/ and eval_se/ values), when given
  gain       {metric: {regime: {column: stat}}}: final − base per run (paired by problem), over seeds
  mtp_over_training {regime: {key: first and last value}}: the MTP head as a drafter over training
             (teacher-forced top-1 in training and evaluation; speculative acceptance where drafting was on)
  claims     the paper's claims (1)–(5), see claims.py
A stat is {"mean", "std", "n", "se", "values": {seed: value}, "se_values": {seed: SE}}: "se" is the
standard error of the mean, std/√n over seeds when n > 1, else the one run's own standard error over
problems (from its eval_se/ keys or the paired gain), and "se_values" each run's own SE. A
comparison is stats.paired_comparison plus "seeds" and "diffs". The headline metric is avg@k
(largest k) when the runs have one, else greedy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mtprl.report.base import Base, problem_difference, run_gain, run_problem_results
from mtprl.report.claims import evaluate_arm_claims, evaluate_claims
from mtprl.report.keys import AVG, MTP_EVAL_KEYS, eval_value, suites_and_metrics
from mtprl.report.load import Run, number, reference_coef
from mtprl.report.stats import describe, paired_comparison
from mtprl.tasks.scoring import average_of_suites

REFERENCE = "detach"
REGIME_ORDER = ("frozen", "detach", "ce", "policy", "occ", "occ-exact")
WALL_TIME = "wall_time"


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by regime (λ₀ arm), regimes in REGIME_ORDER then any others alphabetically, runs by seed."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.regime, []).append(run)
    rank = {name: i for i, name in enumerate(REGIME_ORDER)}

    def order(name: str):  # λ₀ arms REGIME@λ₀ beside their regime, by λ₀
        regime, _, coef = name.partition("@")
        try:
            value = float(coef) if coef else -math.inf
        except ValueError:
            value = math.inf
        return rank.get(regime, len(rank)), regime, value, name

    ordered = sorted(groups, key=order)
    return {name: sorted(groups[name], key=lambda run: str(run.seed)) for name in ordered}


def stat(values: dict[str, float], se_values: dict[str, float] | None = None) -> dict[str, Any]:
    """describe() of the values plus the values themselves, keyed by seed, and the standard error (module doc)."""
    out = {**describe(list(values.values())), "values": values, "se_values": dict(se_values or {})}
    if out["n"] > 1:
        out["se"] = out["std"] / math.sqrt(out["n"])
    else:
        out["se"] = next(iter(out["se_values"].values()), None) if out["n"] == 1 else None
    return out


def _column_stats(runs: list[Run], columns: list[str], metric: str, suites: list[str]) -> dict[str, Any]:
    out = {}
    for column in columns:
        values = {str(run.seed): eval_value(run.final, column, metric, suites) for run in runs}
        ses = {str(run.seed): number(run.final, f"eval_se/{column}/{metric}") for run in runs}
        out[column] = stat({seed: v for seed, v in values.items() if v is not None},
                           {seed: v for seed, v in ses.items() if v is not None and values[seed] is not None})
    return out


def _gains(groups: dict[str, list[Run]], base: Base | None, metrics: list[str], columns: list[str]) -> dict:
    """{metric: {regime: {column: stat of final − base over seeds}}}, from per-problem results."""
    if base is None:
        return {}
    per_run = {(regime, str(run.seed)): run_gain(run, base) for regime, g in groups.items() for run in g}
    out: dict[str, Any] = {}
    for metric in metrics:
        for regime, g in groups.items():
            row = {}
            for column in columns:
                found = {str(r.seed): per_run[(regime, str(r.seed))][metric][column] for r in g
                         if per_run[(regime, str(r.seed))] and column in per_run[(regime, str(r.seed))].get(metric, {})}
                row[column] = stat({s: v["gain"] for s, v in found.items()}, {s: v["se"] for s, v in found.items()})
            out.setdefault(metric, {})[regime] = row
    return out


def _paired_problems(groups: dict[str, list[Run]], metrics: list[str], columns: list[str]) -> dict:
    """Regime − REFERENCE on the runs' final per-problem results, per common seed, averaged over seeds."""
    if REFERENCE not in groups:
        return {}
    results = {(regime, str(run.seed)): run_problem_results(run) for regime, g in groups.items() for run in g}
    out: dict[str, Any] = {}
    for regime, g in groups.items():
        if regime == REFERENCE:
            continue
        seeds = [str(r.seed) for r in g if results.get((regime, str(r.seed)))
                 and results.get((REFERENCE, str(r.seed)))]
        for metric in metrics:
            per_seed = [problem_difference(results[(regime, s)], results[(REFERENCE, s)], metric) for s in seeds]
            row = {}
            for column in columns:
                parts = [d[column] for d in per_seed if column in d]  # (diff, se) per seed
                if parts:
                    diff, se = average_of_suites(parts)  # mean over seeds; seeds independent
                    row[column] = {"diff": diff, "se": se, "seeds": seeds}
            if row:
                out.setdefault(metric, {})[regime] = row
    return out


def _extras(runs: list[Run]) -> dict[str, Any]:
    out = {}
    for key in MTP_EVAL_KEYS:
        values = {str(run.seed): run.final[key] for run in runs if key in run.final}
        if values:
            out[key] = stat(values)
    out[WALL_TIME] = stat({str(run.seed): run.wall_time for run in runs if run.wall_time is not None})
    return out


def _paired(table: dict[str, dict[str, Any]], columns: list[str]) -> dict[str, Any]:
    """Each non-reference regime against REFERENCE, column by column, matched by seed."""
    if REFERENCE not in table:
        return {}
    out: dict[str, Any] = {}
    for regime, row in table.items():
        if regime == REFERENCE:
            continue
        out[regime] = {}
        for column in columns:
            ref, other = table[REFERENCE][column]["values"], row[column]["values"]
            seeds = sorted(set(ref) & set(other))
            diffs = [other[s] - ref[s] for s in seeds]
            out[regime][column] = {"seeds": seeds, "diffs": diffs, **paired_comparison(diffs)}
    return out


# The MTP head as a drafter over training: (kind, key, label); rollout acceptance only for runs that drafted.
MTP_TRACKS = (("train", "mtp/0/top1", "teacher-forced top-1, head 0 (train)"),
              ("eval", "eval/mtp_top1", "teacher-forced top-1 (eval)"),
              ("eval", "eval/mtp_accept", "speculative acceptance (eval)"),
              ("train", "rollout/accept_rate", "speculative acceptance (rollouts)"))


def _mtp_over_training(groups: dict[str, list[Run]]) -> dict[str, dict[str, Any]]:
    """{regime: {key: {"label", "first", "last", "first_step", "last_step", "seeds"}}}: the seed-mean at each
    regime's first and last logged step of every MTP track it logs."""
    out: dict[str, dict[str, Any]] = {}
    for regime, runs in groups.items():
        for kind, key, label in MTP_TRACKS:
            chosen = [r for r in runs if key != "rollout/accept_rate" or (r.config.get("draft_tokens") or 0) > 0]
            per_run = []
            for run in chosen:
                points = [(row["step"], number(row, key)) for row in (run.train if kind == "train" else run.evals)]
                points = [(s, v) for s, v in points if v is not None]
                if points:
                    per_run.append((points[0], points[-1]))
            if per_run:
                out.setdefault(regime, {})[key] = {
                    "label": label, "first": sum(p[0][1] for p in per_run) / len(per_run),
                    "last": sum(p[1][1] for p in per_run) / len(per_run), "first_step": min(p[0][0] for p in per_run),
                    "last_step": max(p[1][0] for p in per_run), "seeds": len(per_run)}
    return out


def _run_entry(run: Run) -> dict[str, Any]:
    config = run.config
    return {"path": run.path, "regime": run.regime, "seed": run.seed, "finished": run.finished,
            "final_step": run.final_step, "last_step": run.last_step, "steps": config.get("steps"),
            "mtp_coef": config.get("mtp_coef"), "occ_estimator": config.get("occ_estimator"),
            "wall_time": run.wall_time, "notes": list(run.notes)}


def summarize(runs: Sequence[Run], base: Base | None = None) -> dict[str, Any]:
    """Every number of the report from the loaded runs (and the shared base evaluation, when given)."""
    groups = group_runs(runs)
    suites, metrics = suites_and_metrics([run.final for run in runs] + [row for run in runs for row in run.evals])
    columns = suites + [AVG]
    accuracy = {m: {regime: _column_stats(g, columns, m, suites) for regime, g in groups.items()} for m in metrics}
    summary: dict[str, Any] = {
        "runs": [_run_entry(run) for g in groups.values() for run in g],
        "regimes": list(groups),
        "reference": REFERENCE,
        "base_coef": reference_coef(runs),
        "suites": suites,
        "metrics": metrics,
        "headline": metrics[0] if metrics else None,
        "accuracy": accuracy,
        "extras": {regime: _extras(g) for regime, g in groups.items()},
        "paired": {m: _paired(accuracy[m], columns) for m in metrics},
        "paired_problems": _paired_problems(groups, metrics, columns),
        "base": None if base is None else {"path": base.path, "model": base.model,
                                           "weights_hash": base.weights_hash, "values": base.values},
        "gain": _gains(groups, base, metrics, columns),
        "mtp_over_training": _mtp_over_training(groups),
    }
    summary["claims"] = evaluate_claims(groups, summary)
    summary["arm_claims"] = evaluate_arm_claims(groups, summary)
    return summary
