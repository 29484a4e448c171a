"""PNG figures of the runs, drawn with matplotlib's Agg canvas (no pyplot, no global backend state).

Every curve is the mean over a regime's seeds with a min–max band across seeds. A figure whose
data is absent is skipped with the reason, which report.md prints; a skipped figure's file left
over from an earlier report in the same folder is removed so it cannot be mistaken for current.
Steps are whole numbers on every x-axis. Accuracy-like panels (fractions in [0, 1]) span at least
0.2 and entropy at least a fifth of its level, so a change of 0.02 is drawn as the small change it
is; rollout acceptance is drawn only for runs that drafted (`draft_tokens` > 0), as the trainer
logs 0 for runs that did not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mtprl.report.claims import OCC_REGIMES, proxy_pairs
from mtprl.report.keys import AVG, eval_value, head_indices
from mtprl.report.load import Run, base_regime, number
from mtprl.report.probe import probe_figure
from mtprl.report.series import RowValue, Series, align
from mtprl.report.stats import pearson

Groups = dict[str, list[Run]]
EXACT_REGIMES = ("ce", "policy", "occ", "occ-exact")
COLORS = {"frozen": "tab:gray", "detach": "tab:blue", "detach-mtp-only": "tab:cyan", "ce": "tab:red",
          "policy": "tab:orange", "occ": "tab:green", "occ-exact": "tab:purple"}
OTHER_COLORS = ("tab:brown", "tab:pink", "tab:olive", "black")


def _color(regime: str, groups: Groups) -> str:
    if regime in COLORS:
        return COLORS[regime]
    others = [g for g in groups if g not in COLORS]
    return OTHER_COLORS[others.index(regime) % len(OTHER_COLORS)]


def _figure(nrows: int, ncols: int, title: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(4.6 * ncols, 3.3 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _draw(ax: Any, series: Series, label: str, color: str, linestyle: str = "-", marker: str | None = None) -> None:
    ax.plot(series.steps, series.mean, label=label, color=color, linestyle=linestyle, marker=marker, markersize=3)
    if series.values.shape[0] > 1:
        ax.fill_between(series.steps, series.low, series.high, color=color, alpha=0.2, linewidth=0)


FRACTION_SPAN = 0.2  # least y-span of a panel of fractions (accuracy, acceptance, top-1)
RELATIVE_SPAN = 0.2  # least y-span of other level-like panels (entropy), as a share of the level


def _step_axis(ax: Any) -> None:
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _least_span(ax: Any, fraction: bool) -> None:
    """Widen the y-axis around its data to the least span (fractions stay inside [0, 1])."""
    lo, hi = ax.get_ylim()
    mid = (lo + hi) / 2
    span = FRACTION_SPAN if fraction else RELATIVE_SPAN * abs(mid)
    if hi - lo >= span:
        return
    lo, hi = mid - span / 2, mid + span / 2
    if fraction:
        shift = max(0.0, -lo) - max(0.0, hi - 1.0)
        lo, hi = max(0.0, lo + shift), min(1.0, hi + shift)
    ax.set_ylim(lo, hi)


def _panel(ax: Any, groups: Groups, kind: str, value: RowValue, title: str, fraction: bool = True) -> bool:
    """One line per regime; False when nothing was drawn."""
    drawn = False
    for regime, runs in groups.items():
        series = align(runs, kind, value)
        if series is not None:
            _draw(ax, series, regime, _color(regime, groups))
            drawn = True
    ax.set_title(title)
    _step_axis(ax)
    if drawn:
        ax.legend(fontsize="small")
        _least_span(ax, fraction)
    return drawn


def _key(key: str) -> RowValue:
    return lambda row: number(row, key)


def _logged(groups: Groups, kind: str, key: str) -> bool:
    """Whether some run's `kind` rows carry a number under `key`."""
    return any(number(row, key) is not None for runs in groups.values() for run in runs
               for row in (run.train if kind == "train" else run.evals))


def fig_accuracy_avg(groups: Groups, summary: dict[str, Any]) -> Figure | str:
    metric, suites = summary["headline"], summary["suites"]
    if metric is None:
        return "no eval accuracy in any run"
    fig, axes = _figure(1, 1, f"average accuracy ({metric}) vs step, ± 1 SE over problems (one seed)")
    if not _panel(axes[0, 0], groups, "eval", lambda row: eval_value(row, AVG, metric, suites), "average"):
        return "no eval row carries an average accuracy"
    _se_bars(axes[0, 0], groups, metric, suites)
    return fig


def _se_bars(ax: Any, groups: Groups, metric: str, suites: list[str]) -> None:
    """Error bars of ± 1 evaluation SE on the curve of each regime with a single run (several seeds show a band)."""
    for regime, runs in groups.items():
        if len(runs) != 1:
            continue
        points = [(row["step"], eval_value(row, AVG, metric, suites), number(row, f"eval_se/{AVG}/{metric}"))
                  for row in runs[0].evals]
        points = [p for p in points if p[1] is not None and p[2] is not None]
        if points:
            steps, values, ses = zip(*points)
            ax.errorbar(steps, values, yerr=ses, fmt="none", ecolor=_color(regime, groups), capsize=2, linewidth=0.8)


def fig_accuracy_suites(groups: Groups, summary: dict[str, Any]) -> Figure | str:
    metric, suites = summary["headline"], summary["suites"]
    if metric is None or not suites:
        return "no per-suite eval accuracy in any run"
    ncols = min(3, len(suites))
    fig, axes = _figure(math.ceil(len(suites) / ncols), ncols, f"accuracy ({metric}) vs step, per suite")
    drawn = [_panel(ax, groups, "eval", _key(f"eval/{suite}/{metric}"), suite) for ax, suite in zip(axes.flat, suites)]
    for ax in list(axes.flat)[len(suites):]:
        ax.set_visible(False)
    return fig if any(drawn) else "no eval row carries a per-suite accuracy"


def _per_head_panels(groups: Groups, regimes: tuple[str, ...], prefix: str, names: list[tuple[str, str]],
                     title: str, marker: str | None = None) -> Figure | None:
    """One panel per (key name, panel title); one line per (regime, head); None when nothing is drawn."""
    chosen = {r: runs for r, runs in groups.items() if base_regime(r) in regimes}
    fig, axes = _figure(1, len(names), title)
    drawn = False
    for ax, (name, panel_title) in zip(axes[0], names):
        panel_drawn = False
        for regime, runs in chosen.items():
            rows = [row for run in runs for row in run.train]
            for head in head_indices(rows, prefix, name):
                series = align(runs, "train", _key(f"{prefix}/{head}/{name}"))
                if series is not None:
                    style = ("-", "--", ":", "-.")[head % 4]
                    _draw(ax, series, f"{regime} head {head}", _color(regime, groups), style, marker)
                    panel_drawn = True
        ax.set_title(panel_title)
        _step_axis(ax)
        ax.axhline(0.0, color="black", linewidth=0.5)
        if panel_drawn:
            ax.legend(fontsize="small")
        drawn = drawn or panel_drawn
    return fig if drawn else None


def fig_occ_coefficients(groups: Groups, summary: dict[str, Any]) -> Figure | str:
    names = [("lambda", "λ used"), ("c_hat", "ĉ behind λ (occ: proxy, occ-exact: exact slope)"),
             ("proxy_c_hat", "proxy ĉ of the same tokens")]
    fig = _per_head_panels(groups, OCC_REGIMES, "mtp", names, "OCC coefficient vs step")
    return fig if fig is not None else "no occ / occ-exact run logs mtp/{k}/lambda or mtp/{k}/c_hat"


def fig_exact_terms(groups: Groups, summary: dict[str, Any]) -> Figure | str:
    names = [("dot", "correlation term ⟨g_RL, g_MTP⟩"), ("g_mtp_sq", "penalty ‖g_MTP‖²")]
    # Exact terms are logged every few steps only: mark the points.
    fig = _per_head_panels(groups, EXACT_REGIMES, "exact", names, "exact gradient terms vs step", marker="o")
    return fig if fig is not None else "no ce / policy / occ run logs exact/{k}/dot or exact/{k}/g_mtp_sq"


def fig_heldout_terms(groups: Groups, summary: dict[str, Any]) -> Figure | str:
    names = [("dot", "held-out ⟨g_RL, g_MTP⟩"), ("same_dot", "same-batch ⟨g_RL, g_MTP⟩ (whole batch)"),
             ("pdot", "held-out ⟨g_RL, P g_MTP⟩ (AdamW)"), ("g_mtp_sq", "held-out ‖g_MTP‖² (split-half)")]
    regimes = tuple(base_regime(r) for r in groups)
    fig = _per_head_panels(groups, regimes, "heldout", names, "held-out gradient terms vs step", marker="o")
    return fig if fig is not None else "no run logs heldout/{k}/dot (runs logged before the held-out terms)"


def fig_probe(groups: Groups, summary: dict[str, Any]) -> Figure | str:
    rows = [row for runs in groups.values() for run in runs for row in run.probe]
    fig = probe_figure(rows)
    return fig if fig is not None else "no run was probed (mtprl probe RUN_DIR writes RUN_DIR/probe/probe.jsonl)"


def fig_proxy_vs_exact(groups: Groups, summary: dict[str, Any]) -> Figure | str:
    pairs = proxy_pairs(groups)
    if not pairs:
        return "no occ / occ-exact run logs both exact/{k}/slope and exact/{k}/proxy_c_hat"
    slopes = [v for s, _ in pairs.values() for v in s]
    proxies = [v for _, p in pairs.values() for v in p]
    r = pearson(slopes, proxies)
    title = "OCC proxy ĉ vs exact slope" + ("" if r is None else f" (Pearson r = {r:.3f}, n = {len(slopes)})")
    fig, axes = _figure(1, 1, title)
    ax = axes[0, 0]
    for regime, (s, p) in pairs.items():
        ax.scatter(s, p, s=12, alpha=0.7, color=_color(regime, groups), label=regime)
    lo, hi = min(slopes + proxies), max(slopes + proxies)
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.7, linestyle="--", label="y = x")
    ax.set_xlabel("exact slope ⟨g_RL, g_MTP⟩ / ‖g_MTP‖²")
    ax.set_ylabel("proxy ĉ (same mini-batch)")
    ax.legend(fontsize="small")
    return fig


MTP_PANELS = (("train", "rollout/accept_rate", "rollout acceptance (train)"),
              ("eval", "eval/mtp_accept", "MTP acceptance (eval)"),
              ("eval", "eval/mtp_top1", "MTP top-1 (eval)"),
              ("train", "mtp/0/top1", "MTP top-1, head 0 (train)"))


def _drafting(groups: Groups) -> Groups:
    """The runs that drafted their rollouts (or do not say): the others log an acceptance of 0 that means nothing."""
    chosen = {r: [run for run in runs if (run.config.get("draft_tokens") or 0) > 0 or "draft_tokens" not in run.config]
              for r, runs in groups.items()}
    return {r: runs for r, runs in chosen.items() if runs}


def fig_mtp_acceptance(groups: Groups, summary: dict[str, Any]) -> Figure | str:
    panels = [(_drafting(groups) if key == "rollout/accept_rate" else groups, kind, key, title)
              for kind, key, title in MTP_PANELS]
    present = [p for p in panels if _logged(p[0], p[1], p[2])]
    if not present:
        return "no run logs rollout/accept_rate (with drafting), eval/mtp_accept, eval/mtp_top1 or mtp/0/top1"
    fig, axes = _figure(1, len(present), "MTP acceptance vs step")
    for ax, (chosen, kind, key, title) in zip(axes[0], present):
        _panel(ax, chosen, kind, _key(key), title)
    return fig


def fig_entropy(groups: Groups, summary: dict[str, Any]) -> Figure | str:
    fig, axes = _figure(1, 1, "policy entropy vs step")
    if not _panel(axes[0, 0], groups, "train", _key("entropy"), "entropy (train)", fraction=False):
        return "no train row carries entropy"
    return fig


# (file name, caption, builder); a builder returns the figure or the reason it was skipped.
FIGURES: tuple[tuple[str, str, Callable[[Groups, dict[str, Any]], Figure | str]], ...] = (
    ("accuracy_avg.png", "average accuracy vs step per regime", fig_accuracy_avg),
    ("accuracy_suites.png", "accuracy vs step per suite", fig_accuracy_suites),
    ("occ_coefficients.png", "OCC λ and ĉ vs step", fig_occ_coefficients),
    ("exact_terms.png", "exact correlation term and penalty vs step (ce, policy, occ)", fig_exact_terms),
    ("heldout_terms.png", "held-out correlation term (beside the same-batch one) and penalty vs step",
     fig_heldout_terms),
    ("proxy_vs_exact.png", "OCC proxy ĉ vs exact slope", fig_proxy_vs_exact),
    ("probe.png", "finite-difference probe: measured dJ/dλ against the predictors (all probed runs)", fig_probe),
    ("mtp_acceptance.png", "MTP acceptance / top-1 vs step", fig_mtp_acceptance),
    ("entropy.png", "entropy vs step", fig_entropy),
)


def write_figures(groups: Groups, summary: dict[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    """Draw every figure into out_dir; [{"file", "caption", "written", "reason"}] in FIGURES order."""
    written = []
    for name, caption, build in FIGURES:
        path = out_dir / name
        result = build(groups, summary)
        if isinstance(result, str):
            path.unlink(missing_ok=True)
            written.append({"file": name, "caption": caption, "written": False, "reason": result})
        else:
            result.savefig(path, dpi=100)
            written.append({"file": name, "caption": caption, "written": True, "reason": None})
    return written
