"""The report's numbers as one JSON-ready dict: runs, final-accuracy tables, paired comparisons, claims.

Layout of the dict returned by `summarize` (and written to summary.json):
  runs       one entry per run: path, regime, seed, finished, final_step, steps, wall_time, ...
  regimes    regime names in display order; suites, metrics (headline first), headline
  accuracy   {metric: {regime: {column: stat}}}, columns = suites + ["avg"]
  extras     {regime: {"eval/mtp_accept" | "eval/mtp_top1" | "wall_time": stat}}
  paired     {metric: {regime: {column: comparison}}} against `detach`, matched by seed
  claims     the paper's claims (1)–(5), see claims.py
A stat is {"mean", "std", "n", "values": {seed: value}}; a comparison is stats.paired_comparison
plus "seeds" and "diffs". The headline metric is avg@k (largest k) when the runs have one, else greedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtprl.report.claims import evaluate_claims
from mtprl.report.keys import AVG, MTP_EVAL_KEYS, eval_value, suites_and_metrics
from mtprl.report.load import Run
from mtprl.report.stats import describe, paired_comparison

REFERENCE = "detach"
REGIME_ORDER = ("frozen", "detach", "ce", "policy", "occ", "occ-exact")
WALL_TIME = "wall_time"


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by regime, regimes in REGIME_ORDER then any others alphabetically, runs by seed."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.regime, []).append(run)
    rank = {name: i for i, name in enumerate(REGIME_ORDER)}
    ordered = sorted(groups, key=lambda name: (rank.get(name, len(rank)), name))
    return {name: sorted(groups[name], key=lambda run: str(run.seed)) for name in ordered}


def stat(values: dict[str, float]) -> dict[str, Any]:
    """describe() of the values plus the values themselves, keyed by seed."""
    return {**describe(list(values.values())), "values": values}


def _column_stats(runs: list[Run], columns: list[str], metric: str, suites: list[str]) -> dict[str, Any]:
    out = {}
    for column in columns:
        values = {str(run.seed): eval_value(run.final, column, metric, suites) for run in runs}
        out[column] = stat({seed: v for seed, v in values.items() if v is not None})
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


def _run_entry(run: Run) -> dict[str, Any]:
    config = run.config
    return {"path": run.path, "regime": run.regime, "seed": run.seed, "finished": run.finished,
            "final_step": run.final_step, "last_step": run.last_step, "steps": config.get("steps"),
            "mtp_coef": config.get("mtp_coef"), "occ_estimator": config.get("occ_estimator"),
            "wall_time": run.wall_time, "notes": list(run.notes)}


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    """Every number of the report from the loaded runs (pure: reads nothing, writes nothing)."""
    groups = group_runs(runs)
    suites, metrics = suites_and_metrics([run.final for run in runs] + [row for run in runs for row in run.evals])
    columns = suites + [AVG]
    accuracy = {m: {regime: _column_stats(g, columns, m, suites) for regime, g in groups.items()} for m in metrics}
    summary: dict[str, Any] = {
        "runs": [_run_entry(run) for g in groups.values() for run in g],
        "regimes": list(groups),
        "reference": REFERENCE,
        "suites": suites,
        "metrics": metrics,
        "headline": metrics[0] if metrics else None,
        "accuracy": accuracy,
        "extras": {regime: _extras(g) for regime, g in groups.items()},
        "paired": {m: _paired(accuracy[m], columns) for m in metrics},
    }
    summary["claims"] = evaluate_claims(groups, summary)
    return summary
