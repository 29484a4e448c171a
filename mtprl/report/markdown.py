"""report.md from the summary dict: tables with the numbers, one line on what each shows, the claims."""

from __future__ import annotations

from typing import Any

from mtprl.report.keys import AVG
from mtprl.report.stats import BETTER, CONFIDENCE, NO_PAIRS, ONE_SEED, WITHIN_NOISE, WORSE
from mtprl.report.tables import (MISSING, SE_NOTE, base_rows, fmt_num, fmt_stat, gain_rows, markdown_table,
                                 paired_problem_rows, paired_rows, summary_rows)

METHOD = """\
- Final numbers come from each run's summary.json, or from its last eval row when the run is
  unfinished (marked `*`). Accuracy cells are mean ± standard error: sd/√n over seeds (sd with
  ddof = 1) when n > 1, the run's own standard error over problems when n = 1 (problems are the
  independent units: a problem's k samples are averaged first); n is the number of runs.
- The base is evaluated once per experiment and shared by every run as its step 0. Gains are
  final − base on the same problems, with the paired SE over problems; the problem-by-problem
  comparison against {reference} likewise. Both measure evaluation noise only (not seed-to-seed
  variation), which is what the seed-paired t-interval adds.
- Paired comparison: per-seed differences regime − {reference}, matched by seed. 95% interval:
  mean ± t(0.975, n−1)·sd/√n. Verdict: "better" when the interval lies above 0, "worse" when below,
  otherwise "within noise"; one pair gets "one seed: no test". The exact two-sided sign test is shown
  beside it (zero differences dropped); with fewer than 6 pairs it cannot reach p < 0.05.
- The claims' criteria are stated with each claim; thresholds are fixed in `mtprl/report/claims.py`."""


def _per_run(summary: dict[str, Any], table: dict[str, Any], run: dict[str, Any]) -> str:
    """One run's value ± its own SE from a {regime: {AVG: stat}} table, '—' when absent."""
    stat = table.get(run["regime"], {}).get(AVG)
    seed = str(run["seed"])
    if not stat or seed not in stat["values"]:
        return MISSING
    se = stat["se_values"].get(seed)
    return fmt_num(stat["values"][seed], signed=table is summary["gain"].get(summary["headline"])) + (
        "" if se is None else f" ± {fmt_num(se)}")


def _runs_section(summary: dict[str, Any]) -> list[str]:
    headline = summary["headline"]
    headers = ["run", "regime", "seed", "λ₀", "OCC estimator", "steps (last / planned)", "finished", "wall time (s)"]
    if headline is not None:
        headers += [f"final {headline} avg ± SE"] + (["gain over base ± SE"] if summary["gain"] else [])
    rows = []
    for run in summary["runs"]:
        planned = MISSING if run["steps"] is None else str(run["steps"])
        last = MISSING if run["last_step"] is None else str(run["last_step"])
        coef = MISSING if run["mtp_coef"] is None else str(run["mtp_coef"])
        row = [run["path"], run["regime"], str(run["seed"]), coef, str(run["occ_estimator"] or MISSING),
               f"{last} / {planned}", "yes" if run["finished"] else "no *", fmt_num(run["wall_time"], 1)]
        if headline is not None:
            row.append(_per_run(summary, summary["accuracy"][headline], run))
            if summary["gain"]:
                row.append(_per_run(summary, summary["gain"].get(headline, {}), run))
        rows.append(row)
    notes = [f"- `{run['path']}`: {note}" for run in summary["runs"] for note in run["notes"]]
    return ["## Runs", "", markdown_table(headers, rows), "", *notes, *([""] if notes else [])]


def _accuracy_section(summary: dict[str, Any], metric: str) -> list[str]:
    headers, rows = summary_rows(summary, metric)
    means = {r: summary["accuracy"][metric][r][AVG] for r in summary["regimes"]}
    ranked = sorted((s["mean"], r) for r, s in means.items() if s["n"])
    label = " (headline)" if metric == summary["headline"] else ""
    lines = [f"## Final accuracy — {metric}{label}", "", f"Cells: {SE_NOTE}.", "", markdown_table(headers, rows), ""]
    if len(ranked) > 1:
        (low, bottom), (high, top) = ranked[0], ranked[-1]
        shown = (f"highest mean average {top} ({fmt_stat(means[top], spread='se')}), lowest {bottom} ({fmt_stat(means[bottom], spread='se')})"
                 if high > low else f"every regime has the same mean average ({fmt_num(high)})")
        lines += [f"What it shows: {shown}. Whether a gap exceeds the seed-to-seed noise is judged by the "
                  "paired comparison below, not by this table.", ""]
    return lines


def _base_section(summary: dict[str, Any]) -> list[str]:
    base = summary["base"]
    if base is None:
        return []
    values = base["values"]
    size = values.get("eval_n/problems")
    sizes = "" if size is None else f" ({size:.0f} problems per suite, {values.get('eval_n/samples', 0):.0f} samples each)"
    return ["## Base model", "", f"`{base['model']}`, weights hash `{base['weights_hash']}`, evaluated once{sizes} "
            "and shared by every run as its step 0 (value ± SE over problems):", "",
            markdown_table(*base_rows(summary)), ""]


def _gain_section(summary: dict[str, Any]) -> list[str]:
    lines = []
    for metric in summary["metrics"]:
        headers, rows = gain_rows(summary, metric)
        if rows:
            lines += [f"## Gain over the base — {metric}", "", "Final − base on the same problems; " + SE_NOTE
                      + " (one run: the paired SE over problems).", "", markdown_table(headers, rows), ""]
    return lines


def _paired_problem_section(summary: dict[str, Any]) -> list[str]:
    reference, lines = summary["reference"], []
    for metric in summary["metrics"]:
        columns = [AVG] + summary["suites"] if metric == summary["headline"] else [AVG]
        headers, rows = paired_problem_rows(summary, metric, columns)
        if rows:
            lines += [f"### {metric}, problem by problem (evaluation noise only)", "",
                      f"Regime − {reference} on the final evaluations' per-problem accuracies, mean over the common "
                      "seeds, ± paired SE over problems. Seed-to-seed variation is not in this SE; with several seeds "
                      "the t-interval above is the test.", "", markdown_table(headers, rows), ""]
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


def _mtp_section(summary: dict[str, Any]) -> list[str]:
    tracks = summary.get("mtp_over_training") or {}
    if not tracks:
        return []
    lines = ["## The MTP head over training", "",
             "Seed-mean at each regime's first → last logged step (training rows: every step; evaluations: "
             "every eval_every steps). Speculative acceptance appears only for runs that drafted.", "",
             "| regime | measure | first (step) | last (step) | seeds |", "|---|---|---|---|---|"]
    for regime, by_key in tracks.items():
        for t in by_key.values():
            lines.append(f"| {regime} | {t['label']} | {t['first']:.3f} ({t['first_step']}) | {t['last']:.3f} "
                         f"({t['last_step']}) | {t['seeds']} |")
    return lines + [""]


def _claims_section(summary: dict[str, Any]) -> list[str]:
    lines = ["## Paper claims", ""]
    for claim in summary["claims"]:
        lines += [f"### ({claim['id']}) {claim['claim']}: **{claim['verdict']}**", "",
                  f"- Criterion: {claim['criterion']}.", f"- Numbers: {claim['explanation']}.", ""]
    others = summary.get("arm_claims") or []
    if others:
        lines += ["### The same claims on the other λ₀ arms", "",
                  "Claims (1)–(4) judged by the same criteria on each λ₀ arm the ones above did not use.", ""]
        for claim in others:
            lines += [f"#### ({claim['id']}) {claim['claim']}: **{claim['verdict']}**", "",
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
    lines += _base_section(summary)
    lines += _runs_section(summary)
    for metric in metrics:
        lines += _accuracy_section(summary, metric)
    lines += _gain_section(summary)
    lines += _paired_section(summary)
    lines += _paired_problem_section(summary)
    lines += _mtp_section(summary)
    lines += _claims_section(summary)
    lines += _figures_section(summary.get("figures", []))
    lines += ["## How the numbers are computed", "", METHOD.format(reference=summary["reference"]), ""]
    return "\n".join(lines)
