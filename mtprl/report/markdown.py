"""report.md from the summary dict: tables with the numbers, one line on what each shows, the claims."""

from __future__ import annotations

from typing import Any

from mtprl.report.keys import AVG
from mtprl.report.stats import BETTER, CONFIDENCE, NO_PAIRS, ONE_SEED, WITHIN_NOISE, WORSE
from mtprl.report.tables import MISSING, fmt_num, fmt_stat, markdown_table, paired_rows, summary_rows

METHOD = """\
- Final numbers come from each run's summary.json, or from its last eval row when the run is
  unfinished (marked `*`). Cells are mean ± sample std (ddof = 1) over seeds; n is the number of runs.
- Paired comparison: per-seed differences regime − {reference}, matched by seed. 95% interval:
  mean ± t(0.975, n−1)·sd/√n. Verdict: "better" when the interval lies above 0, "worse" when below,
  otherwise "within noise"; one pair gets "one seed: no test". The exact two-sided sign test is shown
  beside it (zero differences dropped); with fewer than 6 pairs it cannot reach p < 0.05.
- The claims' criteria are stated with each claim; thresholds are fixed in `mtprl/report/claims.py`."""


def _runs_section(summary: dict[str, Any]) -> list[str]:
    headers = ["run", "regime", "seed", "λ₀", "OCC estimator", "steps (last / planned)", "finished", "wall time (s)"]
    rows = []
    for run in summary["runs"]:
        planned = MISSING if run["steps"] is None else str(run["steps"])
        last = MISSING if run["last_step"] is None else str(run["last_step"])
        coef = MISSING if run["mtp_coef"] is None else str(run["mtp_coef"])
        rows.append([run["path"], run["regime"], str(run["seed"]), coef, str(run["occ_estimator"] or MISSING),
                     f"{last} / {planned}", "yes" if run["finished"] else "no *", fmt_num(run["wall_time"], 1)])
    notes = [f"- `{run['path']}`: {note}" for run in summary["runs"] for note in run["notes"]]
    return ["## Runs", "", markdown_table(headers, rows), "", *notes, *([""] if notes else [])]


def _accuracy_section(summary: dict[str, Any], metric: str) -> list[str]:
    headers, rows = summary_rows(summary, metric)
    means = {r: summary["accuracy"][metric][r][AVG] for r in summary["regimes"]}
    ranked = sorted((s["mean"], r) for r, s in means.items() if s["n"])
    label = " (headline)" if metric == summary["headline"] else ""
    lines = [f"## Final accuracy — {metric}{label}", "", markdown_table(headers, rows), ""]
    if len(ranked) > 1:
        (low, bottom), (high, top) = ranked[0], ranked[-1]
        shown = (f"highest mean average {top} ({fmt_stat(means[top])}), lowest {bottom} ({fmt_stat(means[bottom])})"
                 if high > low else f"every regime has the same mean average ({fmt_num(high)})")
        lines += [f"What it shows: {shown}. Whether a gap exceeds the seed-to-seed noise is judged by the "
                  "paired comparison below, not by this table.", ""]
    return lines


def _paired_section(summary: dict[str, Any]) -> list[str]:
    reference, headline = summary["reference"], summary["headline"]
    lines = [f"## Paired comparison against {reference}", ""]
    if headline is None or not summary["paired"].get(headline):
        why = "no eval accuracy" if headline is None else f"no {reference} run, or no other regime"
        return lines + [f"Not available: {why}.", ""]
    for metric in summary["metrics"]:
        columns = [AVG] + summary["suites"] if metric == headline else [AVG]
        headers, rows = paired_rows(summary, metric, columns)
        lines += [f"### {metric}" + (" (average and per suite)" if metric == headline else " (average)"), "",
                  markdown_table(headers, rows), ""]
    by_verdict: dict[str, list[str]] = {v: [] for v in (BETTER, WORSE, WITHIN_NOISE, ONE_SEED, NO_PAIRS)}
    for regime, by_column in summary["paired"][headline].items():
        by_verdict[by_column[AVG]["verdict"]].append(regime)
    said = "; ".join(f"{v}: {', '.join(r)}" for v, r in by_verdict.items() if r)
    lines += [f"What it shows, on the {headline} average against {reference}: {said}.", ""]
    tested = [c["verdict"] for by_column in summary["paired"][headline].values()
              for suite, c in by_column.items() if suite != AVG and c["n"] > 1]
    if tested:
        outside = sum(v in (BETTER, WORSE) for v in tested)
        chance = (1 - CONFIDENCE) * len(tested)
        lines += [f"Per suite: {outside} of {len(tested)} tested comparisons fall outside the noise; about "
                  f"{chance:.1f} would by chance alone at {CONFIDENCE:.0%} confidence (no correction for "
                  "multiple comparisons), so read single per-suite verdicts with care.", ""]
    return lines


def _claims_section(summary: dict[str, Any]) -> list[str]:
    lines = ["## Paper claims", ""]
    for claim in summary["claims"]:
        lines += [f"### ({claim['id']}) {claim['claim']}: **{claim['verdict']}**", "",
                  f"- Criterion: {claim['criterion']}.", f"- Numbers: {claim['explanation']}.", ""]
    return lines


def _figures_section(figures: list[dict[str, Any]]) -> list[str]:
    lines = ["## Figures", ""]
    for fig in figures:
        if fig["written"]:
            lines += [f"### {fig['caption']}", "", f"![{fig['caption']}]({fig['file']})", ""]
        else:
            lines += [f"### {fig['caption']}", "", f"Skipped: {fig['reason']}.", ""]
    return lines


def render_report(summary: dict[str, Any]) -> str:
    """The whole report.md text (figures listed from summary["figures"] when present)."""
    n_runs, regimes = len(summary["runs"]), summary["regimes"]
    metrics = summary["metrics"]
    intro = (f"{n_runs} run(s) of {len(regimes)} regime(s) ({', '.join(regimes)}); suites: "
             f"{', '.join(summary['suites']) or 'none'}; headline metric: {summary['headline'] or 'none'}"
             + (f" (also shown: {', '.join(metrics[1:])})" if len(metrics) > 1 else "")
             + ". Built by `mtprl report` from the runs' metrics files.")
    lines = ["# mtprl report", "", intro, ""]
    lines += _runs_section(summary)
    for metric in metrics:
        lines += _accuracy_section(summary, metric)
    lines += _paired_section(summary)
    lines += _claims_section(summary)
    lines += _figures_section(summary.get("figures", []))
    lines += ["## How the numbers are computed", "", METHOD.format(reference=summary["reference"]), ""]
    return "\n".join(lines)
