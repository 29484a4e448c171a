"""A metric against step for a group of runs (one per seed), aligned on the union of their steps.

Used by the figures (mean line with a min–max band across seeds) and by the claims that look at
a curve. A run contributes at the steps where its rows carry the value; if it logged one step
twice, the later row wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtprl.report.load import Run

RowValue = Callable[[dict[str, Any]], "float | None"]


@dataclass
class Series:
    """`values[r, s]` is run r's value at `steps[s]`, NaN where that run has none."""

    steps: np.ndarray  # [S] int
    values: np.ndarray  # [R, S] float

    @property
    def count(self) -> np.ndarray:
        """Number of runs with a value at each step.  # [S]"""
        return np.sum(~np.isnan(self.values), axis=0)

    @property
    def mean(self) -> np.ndarray:
        return np.nanmean(self.values, axis=0)  # [S]; every step has at least one value

    @property
    def low(self) -> np.ndarray:
        return np.nanmin(self.values, axis=0)  # [S]

    @property
    def high(self) -> np.ndarray:
        return np.nanmax(self.values, axis=0)  # [S]

    @property
    def std(self) -> np.ndarray:
        """Sample std (ddof = 1) across runs at each step, NaN where fewer than 2 runs.  # [S]"""
        count = self.count
        centred = np.where(np.isnan(self.values), 0.0, self.values - self.mean)  # [R, S]
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.sum(centred**2, axis=0) / (count - 1)
        return np.where(count > 1, np.sqrt(var), np.nan)


def run_points(rows: Sequence[dict[str, Any]], value: RowValue) -> dict[int, float]:
    """step -> value over the rows that carry one."""
    points: dict[int, float] = {}
    for row in rows:
        v = value(row)
        if v is not None:
            points[row["step"]] = v
    return points


def align(runs: Sequence[Run], kind: str, value: RowValue) -> Series | None:
    """The runs' `kind` rows ("train" or "eval") mapped through `value`; None when no run has any."""
    per_run = [run_points(run.train if kind == "train" else run.evals, value) for run in runs]
    per_run = [points for points in per_run if points]
    if not per_run:
        return None
    steps = np.array(sorted(set().union(*per_run)), dtype=np.int64)  # [S]
    values = np.full((len(per_run), len(steps)), np.nan)  # [R, S]
    index = {int(s): i for i, s in enumerate(steps)}
    for r, points in enumerate(per_run):
        for step, v in points.items():
            values[r, index[step]] = v
    return Series(steps=steps, values=values)
