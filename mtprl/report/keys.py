"""What the metric keys name: eval suites and metrics, MTP heads, and the average column.

Suite names, the avg@k metrics and the MTP head indices are read from the keys, never assumed:
  eval/{suite}/avg@{k}, eval/{suite}/greedy   per-suite accuracy (suite may itself contain '/')
  eval/avg/{metric}                           the trainer's average over suites
  {prefix}/{k}/{name}                         per-head train keys, e.g. mtp/0/lambda, exact/0/dot
When a run lacks `eval/avg/{metric}` but has every suite, the average column is the plain mean of
its suites (the trainer's own average is used whenever it is there).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from mtprl.report.load import number

AVG = "avg"
GREEDY = "greedy"
_METRIC = re.compile(r"avg@(\d+)|greedy")
# Scalar eval keys about the MTP head, and their column titles.
MTP_EVAL_KEYS = {"eval/mtp_accept": "MTP accept", "eval/mtp_top1": "MTP top-1"}


def split_eval_key(key: str) -> tuple[str, str] | None:
    """`eval/{suite}/{metric}` -> (suite, metric) for accuracy keys; None for any other key."""
    if not key.startswith("eval/") or "/" not in key[5:]:
        return None
    suite, metric = key[5:].rsplit("/", 1)
    return (suite, metric) if _METRIC.fullmatch(metric) else None


def _metric_order(metric: str) -> tuple[int, int]:
    """avg@k with the largest k first, then greedy."""
    match = _METRIC.fullmatch(metric)
    return (1, 0) if match is None or match.group(1) is None else (0, -int(match.group(1)))


def suites_and_metrics(flats: Iterable[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Suites (in order of first appearance, without `avg`) and metrics (headline first) in these rows."""
    suites: dict[str, None] = {}
    metrics: set[str] = set()
    for flat in flats:
        for key in flat:
            parsed = split_eval_key(key)
            if parsed is None:
                continue
            suite, metric = parsed
            metrics.add(metric)
            if suite != AVG:
                suites.setdefault(suite, None)
    return list(suites), sorted(metrics, key=_metric_order)


def eval_value(flat: dict[str, Any], suite: str, metric: str, suites: list[str]) -> float | None:
    """Accuracy of `suite` (or AVG) under `metric` in one eval row or final-eval dict."""
    value = number(flat, f"eval/{suite}/{metric}")
    if value is not None or suite != AVG or not suites:
        return value
    parts = [number(flat, f"eval/{s}/{metric}") for s in suites]
    if any(p is None for p in parts):
        return None
    return sum(parts) / len(parts)  # type: ignore[arg-type]


def head_indices(rows: Iterable[dict[str, Any]], prefix: str, name: str) -> list[int]:
    """Sorted k for which some row has the key `{prefix}/{k}/{name}`."""
    pattern = re.compile(rf"{re.escape(prefix)}/(\d+)/{re.escape(name)}")
    found = {int(m.group(1)) for row in rows for key in row if (m := pattern.fullmatch(key))}
    return sorted(found)
