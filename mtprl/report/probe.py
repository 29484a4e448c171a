"""The finite-difference probe's results (`mtprl probe`) → agreement statistics, a table and a figure.

A probe row (one line of `RUN_DIR/probe/probe.jsonl`, one probed checkpoint) holds the measured effect
of λ on the objective J, `dJ_dlambda` (central difference over λ ∈ {−c, +c}) and `curvature`, each
with its standard error, and the predictors measured at the same training state (`PREDICTORS`). Per
predictor we report over the rows: the sign agreement (share of rows where sign(predictor) =
sign(dJ/dλ); rows with either one exactly 0 are left out) and Spearman's ρ, each with a percentile
bootstrap 95% interval (rows resampled with replacement, a seeded `random.Random`; resamples where ρ
is undefined are skipped). Every predictor is oriented so that a positive value says "raising λ
raises J" (DESIGN §1: one step changes J by about +ηλ⟨g_RL, P g_MTP⟩ to first order, as L_RL ≈ −J).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtprl.report.load import PROBE_DIR, PROBE_FILE, number, read_probe_rows
from mtprl.report.stats import spearman

# predictor key in a probe row -> its label in tables and figures
PREDICTORS = {
    "proxy_mean_ratio": "proxy ĉ (mean-ratio)",
    "proxy_ratio_of_sums": "proxy ĉ (ratio-of-sums)",
    "exact_slope": "same-batch slope ⟨g_RL, g_MTP⟩/‖g_MTP‖²",
    "heldout_dot": "held-out ⟨g_RL, g_MTP⟩",
    "heldout_pdot": "held-out ⟨g_RL, P g_MTP⟩",
    "same_pdot": "same-batch ⟨g_RL, P g_MTP⟩",
    "fresh_pdot": "fresh-rollout ⟨g_RL, P g_MTP⟩",
}
__all__ = ["PREDICTORS", "PROBE_DIR", "PROBE_FILE", "agreement", "agreement_table", "bootstrap_ci", "probe_figure",
           "read_probe_rows", "sign_agreement"]
BOOTSTRAP = 2000
CONFIDENCE = 0.95


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def sign_agreement(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, int]:
    """(share of pairs with equal non-zero signs, number of pairs with both signs non-zero)."""
    pairs = [(_sign(a), _sign(b)) for a, b in zip(x, y) if _sign(a) and _sign(b)]
    return (sum(a == b for a, b in pairs) / len(pairs) if pairs else None), len(pairs)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def bootstrap_ci(x: Sequence[float], y: Sequence[float], statistic, resamples: int = BOOTSTRAP,
                 seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of statistic(x, y) over resampled pairs; (None, None) if undefined."""
    rng = random.Random(seed)
    n = len(x)
    values = []
    for _ in range(resamples if n >= 2 else 0):
        idx = [rng.randrange(n) for _ in range(n)]
        value = statistic([x[i] for i in idx], [y[i] for i in idx])
        if value is not None:
            values.append(value)
    if len(values) < 2:
        return None, None
    alpha = (1 - confidence) / 2
    return _percentile(values, alpha), _percentile(values, 1 - alpha)


def agreement(rows: Sequence[dict[str, Any]], resamples: int = BOOTSTRAP, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per predictor present in the rows: n, sign agreement and Spearman ρ with dJ/dλ, each with a bootstrap CI."""
    out = {}
    for key, label in PREDICTORS.items():
        pairs = [(number(r, key), number(r, "dJ_dlambda")) for r in rows]
        pairs = [(p, d) for p, d in pairs if p is not None and d is not None]
        if not pairs:
            continue
        x, y = [p for p, _ in pairs], [d for _, d in pairs]
        share, n_signed = sign_agreement(x, y)
        rho = spearman(x, y) if len(x) >= 2 else None
        sign_lo, sign_hi = bootstrap_ci(x, y, lambda a, b: sign_agreement(a, b)[0], resamples, seed)
        rho_lo, rho_hi = bootstrap_ci(x, y, lambda a, b: spearman(a, b), resamples, seed)
        out[key] = {"label": label, "n": len(x), "n_signed": n_signed, "sign_agreement": share,
                    "sign_ci": [sign_lo, sign_hi], "spearman": rho, "spearman_ci": [rho_lo, rho_hi]}
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def agreement_table(stats: dict[str, dict[str, Any]]) -> str:
    """A markdown table of `agreement`'s result."""
    lines = ["| predictor | rows | sign agreement [95% CI] | Spearman ρ [95% CI] |", "|---|---|---|---|"]
    for s in stats.values():
        lines.append(f"| {s['label']} | {s['n']} | {_fmt(s['sign_agreement'])} [{_fmt(s['sign_ci'][0])}, "
                     f"{_fmt(s['sign_ci'][1])}] | {_fmt(s['spearman'])} [{_fmt(s['spearman_ci'][0])}, "
                     f"{_fmt(s['spearman_ci'][1])}] |")
    return "\n".join(lines)


def probe_figure(rows: Sequence[dict[str, Any]]):
    """Scatter of every predictor against dJ/dλ (± 1 SE), a matplotlib Figure; None without rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [k for k in PREDICTORS if any(number(r, k) is not None for r in rows)]
    if not rows or not keys:
        return None
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.3 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle("finite-difference probe: measured dJ/dλ against the predictors")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        pts = [(number(r, key), number(r, "dJ_dlambda"), number(r, "dJ_dlambda_se") or 0.0) for r in rows]
        pts = [p for p in pts if p[0] is not None]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o", markersize=3,
                    capsize=2)
        ax.axhline(0.0, color="gray", linewidth=0.6)
        ax.axvline(0.0, color="gray", linewidth=0.6)
        ax.set_xlabel(PREDICTORS[key], fontsize=8)
        ax.set_ylabel("dJ/dλ (± 1 SE)", fontsize=8)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    return fig
