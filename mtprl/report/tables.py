"""Tables from the summary dict: the same rows rendered as markdown or as aligned plain text.

Accuracy cells show `mean ± standard error` (3 decimals): the SE over seeds (std/√n) when n > 1, the
run's own SE over problems for one run; other cells `mean ± std` over seeds (1 decimal for seconds).
A cell built from fewer runs than its row's n says so with `(n=…)`; a missing value is `—`.
"""

from __future__ import annotations

from typing import Any

from mtprl.report.keys import AVG, MTP_EVAL_KEYS
from mtprl.report.summary import WALL_TIME

MISSING = "—"
SE_NOTE = "mean ± standard error (over seeds when n > 1, over problems for one run)"


def fmt_num(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_stat(stat: dict[str, Any] | None, digits: int = 3, n_row: int | None = None, spread: str = "std",
             signed: bool = False) -> str:
    """'0.450 ± 0.071' (± `spread`: "std" or "se"), '0.450' without one, '—' for none; '(n=k)' when k
    differs from the row's n."""
    if not stat or stat["n"] == 0:
        return MISSING
    text = fmt_num(stat["mean"], digits, signed)
    if stat.get(spread) is not None:
        text += f" ± {fmt_num(stat[spread], digits)}"
    if n_row is not None and stat["n"] != n_row:
        text += f" (n={stat['n']})"
    return text


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _row_label(summary: dict[str, Any], regime: str) -> str:
    """The regime, with '*' when one of its runs is unfinished."""
    unfinished = any(not run["finished"] for run in summary["runs"] if run["regime"] == regime)
    return f"{regime} *" if unfinished else regime


def summary_rows(summary: dict[str, Any], metric: str) -> tuple[list[str], list[list[str]]]:
    """Regime × (n, suites, avg, MTP columns present, wall time) for one accuracy metric."""
    mtp_keys = [k for k in MTP_EVAL_KEYS if any(k in extras for extras in summary["extras"].values())]
    headers = ["regime", "n", *summary["suites"], AVG, *(MTP_EVAL_KEYS[k] for k in mtp_keys), "wall time (s)"]
    rows = []
    for regime in summary["regimes"]:
        n = sum(1 for run in summary["runs"] if run["regime"] == regime)
        accuracy, extras = summary["accuracy"][metric][regime], summary["extras"][regime]
        cells = [fmt_stat(accuracy[c], n_row=n, spread="se") for c in summary["suites"] + [AVG]]
        cells += [fmt_stat(extras.get(k), n_row=n, spread="se") for k in mtp_keys]
        cells.append(fmt_stat(extras[WALL_TIME], digits=1, n_row=n, spread="se"))
        rows.append([_row_label(summary, regime), str(n), *cells])
    return headers, rows


def gain_rows(summary: dict[str, Any], metric: str) -> tuple[list[str], list[list[str]]]:
    """Regime × (n, suites, avg, avg / SE): final − base accuracy, paired by problem, mean ± SE."""
    headers = ["regime", "n", *summary["suites"], AVG, "avg / SE"]
    rows = []
    for regime, row in summary["gain"].get(metric, {}).items():
        n = sum(1 for run in summary["runs"] if run["regime"] == regime)
        cells = [fmt_stat(row[c], n_row=n, spread="se", signed=True) for c in summary["suites"] + [AVG]]
        avg = row[AVG]
        ratio = MISSING if not avg["n"] or not avg["se"] else f"{avg['mean'] / avg['se']:.1f}"
        rows.append([_row_label(summary, regime), str(n), *cells, ratio])
    return headers, rows


def base_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Suite × metric of the shared base evaluation, value ± SE over problems."""
    values = summary["base"]["values"]
    headers = ["suite", *summary["metrics"]]
    rows = []
    for suite in summary["suites"] + [AVG]:
        cells = []
        for metric in summary["metrics"]:
            v, se = values.get(f"eval/{suite}/{metric}"), values.get(f"eval_se/{suite}/{metric}")
            cells.append(MISSING if v is None else fmt_num(v) + ("" if se is None else f" ± {fmt_num(se)}"))
        rows.append([suite, *cells])
    return headers, rows


def paired_problem_rows(summary: dict[str, Any], metric: str, columns: list[str]) -> tuple[list[str], list[list[str]]]:
    """Regime × column: the problem-by-problem difference against the reference (evaluation noise only)."""
    headers = ["regime", "column", "seeds", "diff ± SE", "diff / SE"]
    rows = []
    for regime, by_column in summary["paired_problems"].get(metric, {}).items():
        for column in columns:
            c = by_column.get(column)
            if c is None:
                continue
            ratio = MISSING if not c["se"] else f"{c['diff'] / c['se']:+.1f}"
            rows.append([regime, column, ", ".join(c["seeds"]), f"{c['diff']:+.3f} ± {c['se']:.3f}", ratio])
    return headers, rows


def paired_rows(summary: dict[str, Any], metric: str, columns: list[str]) -> tuple[list[str], list[list[str]]]:
    """One row per (regime, column): per-seed differences vs the reference, interval, sign test, verdict."""
    headers = ["regime", "column", "per-seed diff", "mean diff", "95% CI", "sign-test p", "verdict"]
    rows = []
    for regime, by_column in summary["paired"].get(metric, {}).items():
        for column in columns:
            c = by_column[column]
            diffs = ", ".join(f"s{seed}: {d:+.3f}" for seed, d in zip(c["seeds"], c["diffs"])) or MISSING
            ci = MISSING if c["ci_low"] is None else f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
            p = MISSING if c["p_sign"] is None or c["n"] < 2 else f"{c['p_sign']:.3f}"
            rows.append([regime, column, diffs, fmt_num(c["mean"], signed=True), ci, p, c["verdict"]])
    return headers, rows


def format_summary_table(summary: dict[str, Any], metric: str | None = None) -> str:
    """The regime × suite table of final accuracy as aligned plain text, for the terminal."""
    metric = metric or summary["headline"]
    if metric is None:
        return "no eval accuracy in these runs"
    headers, rows = summary_rows(summary, metric)
    title = f"final accuracy ({metric}), {SE_NOTE}"
    unfinished = any(row[0].endswith(" *") for row in rows)
    note = "\n* includes an unfinished run (numbers from its last eval)" if unfinished else ""
    return f"{title}\n{text_table(headers, rows)}{note}"
