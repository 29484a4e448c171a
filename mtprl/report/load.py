"""Read run directories written by the trainer: config.yaml, metrics.jsonl, summary.json.

A run directory holds
  config.yaml    the run's flat config (regime, seed, mtp_coef, occ_estimator, steps, ...)
  metrics.jsonl  one JSON object per line: {"kind": "train"|"eval", "step": int, "time": s, ...floats}
  summary.json   final eval metrics + wall_time + regime + seed; absent while a run is unfinished.
Everything is read and checked before the report writes a byte: a missing directory or metrics
file, an unreadable config or summary, or a malformed line raises ReportError naming the file (and
line) and the fix. One tolerance: the last line of an *unfinished* run (no summary.json) may have
been cut short by a crash; when it lacks its newline and does not parse, it is dropped and the
run's notes say so. Rows of other kinds than train/eval are kept in no list and ignored.
Wherever a number is read, values that are not finite numbers (null, NaN, inf, text) count as absent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtprl.errors import UserError

ROW_KINDS = ("train", "eval")
# Keys of an eval row kept as a run's final numbers: accuracies, their standard errors and sizes, habits.
FINAL_PREFIXES = ("eval/", "eval_se/", "eval_n/", "habit/")


class ReportError(UserError, ValueError):
    """A run directory or one of its files cannot be used; the message names it and the fix."""


@dataclass
class Run:
    """One run directory, read.

    `final` holds the final eval metrics (flat `eval/...` keys): from summary.json when the run
    finished, else from its last eval row. `final_step` is the step those numbers belong to.
    """

    path: str
    regime: str
    seed: int | str
    config: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    final: dict[str, float]
    final_step: int | None
    wall_time: float | None
    finished: bool
    notes: list[str] = field(default_factory=list)
    probe: list[dict[str, Any]] = field(default_factory=list)  # rows of RUN_DIR/probe/probe.jsonl (mtprl probe)

    @property
    def last_step(self) -> int | None:
        """The largest step among the train and eval rows (None without rows)."""
        steps = [row["step"] for row in self.train + self.evals]
        return max(steps) if steps else None


def number(row: dict[str, Any], key: str) -> float | None:
    """`row[key]` as a float, or None when it is missing or not a finite number."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings joined into flat `a/b/c` keys; a nested key that holds a '/' is already a full path.

    {"eval": {"eval/add/greedy": 0.5}} (the trainer's summary.json), {"eval": {"add": {"greedy": 0.5}}}
    and {"eval/add/greedy": 0.5} all give {"eval/add/greedy": 0.5}; {"eval": {"eval_se/add/greedy": 0.01}}
    gives {"eval_se/add/greedy": 0.01}.
    """
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = key if prefix and "/" in key else f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}/"))
        else:
            flat[name] = value
    return flat


def _check_row(row: Any, path: Path, lineno: int) -> dict[str, Any]:
    where = f"{path}:{lineno}"
    if not isinstance(row, dict):
        raise ReportError(f"{where}: expected a JSON object per line, got {type(row).__name__}; fix this line")
    kind = row.get("kind")
    if not isinstance(kind, str):
        raise ReportError(f"{where}: the row has no string 'kind' (train or eval); fix this line")
    step = row.get("step")
    if kind in ROW_KINDS and (isinstance(step, bool) or not isinstance(step, int)):
        raise ReportError(f"{where}: a {kind} row needs an integer 'step', got {step!r}; fix this line")
    return row


def read_metrics(path: Path, finished: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse metrics.jsonl into its rows (file order) and notes about what was dropped."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read {path}: {err}") from None
    lines = text.split("\n")  # a trailing newline leaves a last empty element
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines) and not finished:  # unterminated last line of an unfinished run
                notes.append(f"dropped line {lineno} of {path}: cut short (no newline, run unfinished)")
                continue
            raise ReportError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or delete this line") from None
        rows.append(_check_row(row, path, lineno))
    return rows, notes


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path} is not readable YAML ({err}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def _read_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path} is not valid JSON ({err}); fix it, or delete it to treat the run as "
                          "unfinished") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return flatten(data)


def _identity(run_dir: Path, config: dict[str, Any], summary: dict[str, Any] | None) -> tuple[str, int | str]:
    """(regime, seed) from config.yaml, else from summary.json."""
    regime = config.get("regime", (summary or {}).get("regime"))
    seed = config.get("seed", (summary or {}).get("seed"))
    if not isinstance(regime, str) or not regime:
        raise ReportError(f"{run_dir}: no 'regime' in config.yaml or summary.json; the report groups runs by it")
    if isinstance(seed, bool) or not isinstance(seed, (int, str)):
        raise ReportError(f"{run_dir}: no integer 'seed' in config.yaml or summary.json; paired comparisons "
                          "match runs by it")
    return regime, seed


def _final_eval(run_dir: Path, summary: dict[str, Any] | None, evals: list[dict[str, Any]],
                notes: list[str]) -> tuple[dict[str, float], int | None]:
    """Final eval metrics and their step: summary.json's `eval/` keys, else the last eval row."""
    last = max(evals, key=lambda row: row["step"]) if evals else {}
    from_summary = {k: number(summary, k) for k in summary or {} if k.startswith(FINAL_PREFIXES)}
    if summary is not None and from_summary:
        step = summary.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else last.get("step")
        return {k: v for k, v in from_summary.items() if v is not None}, step
    if summary is None:
        where = f"step {last['step']}" if last else "no eval row at all"
        notes.append(f"unfinished (no summary.json): final numbers from the last eval row ({where})")
    else:
        notes.append(f"{run_dir / 'summary.json'} has no eval/ keys: final numbers from the last eval row")
    final = {k: number(last, k) for k in last if k.startswith(FINAL_PREFIXES)}
    return {k: v for k, v in final.items() if v is not None}, last.get("step")


PROBE_DIR, PROBE_FILE = "probe", "probe.jsonl"


def read_probe_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows `mtprl probe` wrote for a run (empty when it was never probed); ReportError on a bad line."""
    path = Path(run_dir) / PROBE_DIR / PROBE_FILE
    if not path.is_file():
        return []
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or delete this line") from None
        if not isinstance(row, dict) or number(row, "dJ_dlambda") is None:
            raise ReportError(f"{path}:{lineno}: a probe row needs a number 'dJ_dlambda'; fix or delete this line")
        rows.append(row)
    return rows


def load_run(path: str | Path) -> Run:
    """Read and check one run directory; raises ReportError on anything unusable."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ReportError(f"run directory '{run_dir}' does not exist; pass directories written by a training run")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"'{run_dir}' has no metrics.jsonl, so it is not a run directory; pass the folder "
                          "a run wrote")
    config = _read_config(run_dir / "config.yaml")
    summary = _read_summary(run_dir / "summary.json")
    rows, notes = read_metrics(metrics, finished=summary is not None)
    regime, seed = _identity(run_dir, config, summary)
    train = [row for row in rows if row["kind"] == "train"]
    evals = [row for row in rows if row["kind"] == "eval"]
    final, final_step = _final_eval(run_dir, summary, evals, notes)
    wall = number(summary, "wall_time") if summary is not None else None
    if wall is None:
        times = [t for t in (number(row, "time") for row in rows) if t is not None]
        wall = max(times) if times else None
    return Run(path=str(run_dir), regime=regime, seed=seed, config=config, train=train, evals=evals,
               final=final, final_step=final_step, wall_time=wall, finished=summary is not None, notes=notes,
               probe=read_probe_rows(run_dir))


REFERENCE_REGIME = "detach"


def _coef(run: Run) -> float | None:
    value = run.config.get("mtp_coef")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def reference_coef(runs: Iterable[Run]) -> float | None:
    """The experiment's base λ₀: the most common mtp_coef of the detach runs, else of all runs (None if none)."""
    runs = list(runs)
    coefs = [c for c in (_coef(r) for r in runs if r.config.get("regime", r.regime) == REFERENCE_REGIME)
             if c is not None] or [c for c in (_coef(r) for r in runs) if c is not None]
    return max(sorted(set(coefs)), key=coefs.count) if coefs else None


def arm_label(regime: str, coef: float) -> str:
    """How a run of `regime` at λ₀ = `coef` is named when its regime is swept (as `mtprl compare --arms` names it)."""
    return f"{regime}@{coef:g}"


def base_regime(name: str) -> str:
    """The regime of a group name: `occ` for the arm `occ@1` and for `occ` itself."""
    return name.partition("@")[0]


def label_arms(runs: list[Run]) -> None:
    """λ₀ arms: every run of a regime whose runs have several mtp_coef values, or another one than the base
    λ₀ (`reference_coef`), is labelled REGIME@λ₀ in `run.regime` (its config keeps the regime name); the
    others keep the plain regime name, and so do the reference's (detach's) runs at the base λ₀, which
    every arm is compared with."""
    base = reference_coef(runs)
    by_regime: dict[str, set] = {}
    for run in runs:
        by_regime.setdefault(run.regime, set()).add(_coef(run))
    swept = {regime for regime, coefs in by_regime.items() if None not in coefs and coefs != {base}}
    for run in runs:
        if run.regime in swept and not (run.regime == REFERENCE_REGIME and _coef(run) == base):
            run.regime = arm_label(run.regime, _coef(run))


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Read every run directory (all checked before anything is returned); one run per regime (λ₀ arm) and seed."""
    paths = list(paths)
    if not paths:
        raise ReportError("no run directories given; pass one or more folders written by training runs")
    runs = [load_run(p) for p in paths]
    label_arms(runs)
    seen: dict[tuple[str, str], Run] = {}
    for run in runs:
        key = (run.regime, str(run.seed))
        if key in seen:
            raise ReportError(
                f"'{seen[key].path}' and '{run.path}' are both regime '{run.regime}' seed {run.seed}; the report "
                "compares one run per regime and seed, so pass only one of them (report the others separately)")
        seen[key] = run
    return runs
