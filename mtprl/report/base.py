"""The experiment's shared base evaluation, and each run's gain over it, problem by problem.

`mtprl compare` evaluates the starting model once into OUTPUT_DIR/base (`eval.json` with the
metrics, weights hash and evaluation settings; `evals/step-0.json` with per-problem results) and
the runs skip their own step-0 evaluation. Here that evaluation becomes
- every run's step-0 eval row (`base_row`), computed on the first `eval_limit` problems of each
  suite, the very problems the run's intermediate evaluations use, so curves start at the base;
- the reference of each run's gain (`run_gain`): final accuracy − base accuracy on the same
  problems, with the paired standard error over problems (`mtprl.tasks.scoring.paired_difference`),
  per suite and averaged over suites (SE √(Σ SE²)/S). It measures evaluation noise only: a
  second seed of the same run would differ by more.
Per-problem files: {"step": N, "suites": {suite: {"correct": [c_i], "greedy": [0/1], "samples": k}}}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtprl.report.load import ReportError, Run
from mtprl.tasks.scoring import average_of_suites, paired_difference, suite_accuracy


@dataclass
class Base:
    """The shared base evaluation of an experiment."""

    path: str
    model: str
    weights_hash: str | None
    values: dict[str, float]  # the eval/, eval_se/, eval_n/, habit/ keys at the final evaluation's sizes
    suites: dict[str, dict[str, Any]]  # per-problem results


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"cannot read {what} {path}: {err}; re-run the experiment command to rewrite it") from None
    if not isinstance(data, dict):
        raise ReportError(f"{what} {path} must hold a JSON object")
    return data


def load_base(base_dir: str | Path) -> Base:
    """Read OUTPUT_DIR/base (eval.json and evals/step-0.json)."""
    folder = Path(base_dir)
    record = _read_json(folder / "eval.json", "the base evaluation")
    detail = _read_json(folder / "evals" / "step-0.json", "the base's per-problem results")
    return Base(path=str(folder), model=str(record.get("model")), weights_hash=record.get("weights_hash"),
                values=dict(record.get("values", {})), suites=dict(detail.get("suites", {})))


def _suite_values(results: dict[str, dict[str, Any]], size: int | None) -> dict[str, float]:
    """eval/ and eval_se/ keys (avg@k, greedy, and their average over suites) from per-problem results."""
    out: dict[str, float] = {}
    avg, greedy = [], []
    k = None
    for name, r in results.items():
        k = r["samples"]
        correct, right = r["correct"][:size], r["greedy"][:size]
        (a, ase), (g, gse) = suite_accuracy(correct, k), suite_accuracy(right, 1)
        out.update({f"eval/{name}/avg@{k}": a, f"eval_se/{name}/avg@{k}": ase,
                    f"eval/{name}/greedy": g, f"eval_se/{name}/greedy": gse})
        avg.append((a, ase))
        greedy.append((g, gse))
    if results:
        out[f"eval/avg/avg@{k}"], out[f"eval_se/avg/avg@{k}"] = average_of_suites(avg)
        out["eval/avg/greedy"], out["eval_se/avg/greedy"] = average_of_suites(greedy)
    return out


def base_row(base: Base, eval_limit: int | None) -> dict[str, Any]:
    """The base as a step-0 eval row on the first `eval_limit` problems of each suite (None: all)."""
    return {"kind": "eval", "step": 0, "time": 0.0, "from_base": True, **_suite_values(base.suites, eval_limit)}


def attach_base(runs: list[Run], base: Base) -> None:
    """Give every run without a step-0 eval row the base's, on that run's intermediate problems."""
    for run in runs:
        if any(row["step"] == 0 for row in run.evals):
            continue
        limit = run.config.get("eval_limit")
        run.evals.insert(0, base_row(base, limit if isinstance(limit, int) else None))


def run_problem_results(run: Run) -> dict[str, dict[str, Any]] | None:
    """The run's per-problem results at its final step (evals/step-N.json), None when absent."""
    if run.final_step is None:
        return None
    path = Path(run.path) / "evals" / f"step-{run.final_step}.json"
    return _read_json(path, "per-problem results").get("suites") if path.is_file() else None


def _per_problem(result: dict[str, Any], metric: str) -> list[float] | None:
    """Per-problem accuracies of one suite's results under `metric` (avg@k or greedy); None if not measured."""
    if metric == "greedy":
        return [float(g) for g in result["greedy"]]
    k = result["samples"]
    return [c / k for c in result["correct"]] if metric == f"avg@{k}" else None


def problem_difference(ours: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]],
                       metric: str) -> dict[str, tuple[float, float]]:
    """{suite | "avg": (mean of ours − theirs, paired SE)} on the problems both evaluated (a common prefix)."""
    out: dict[str, tuple[float, float]] = {}
    for name, result in ours.items():
        if name not in theirs:
            continue
        a, b = _per_problem(result, metric), _per_problem(theirs[name], metric)
        if a is None or b is None:
            continue
        n = min(len(a), len(b))
        out[name] = paired_difference(a[:n], b[:n])
    if out:
        out["avg"] = average_of_suites(list(out.values()))
    return out


def run_gain(run: Run, base: Base) -> dict[str, dict[str, dict[str, float]]] | None:
    """{metric: {suite | "avg": {"gain", "se"}}}: final − base on the common problems, paired by problem."""
    final = run_problem_results(run)
    if final is None:
        return None
    k = next(iter(final.values()))["samples"] if final else 1
    out: dict[str, dict[str, dict[str, float]]] = {}
    for metric in (f"avg@{k}", "greedy"):
        diffs = problem_difference(final, base.suites, metric)
        if diffs:
            out[metric] = {column: {"gain": d, "se": se} for column, (d, se) in diffs.items()}
    return out
