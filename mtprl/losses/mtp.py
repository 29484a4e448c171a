"""The MTP term added to the RL loss under a regime (DESIGN §1), for K heads at once.

Layout: `mtp_log_prob [K, B, T]` holds head k's log-prob m_t of the sampled token y_t, aligned to
the main head's position t; `mtp_mask [K, B, T]` marks where head k scores a valid response token
(a head of depth k cannot score the first k+1 positions). A plain `[B, T]` pair means K = 1.
`log_prob`, `old_log_prob` are the main head's `[B, T]`; `advantages` is `[B]` or `[B, T]`.

    L_MTP = Σ_k term_k,   term_k = the regime's head loss of head k with its coefficient λ_k
The regime (looked up in `mtprl.losses.regimes`) supplies the head loss and the coefficient rule
(`mtprl.losses.mtp_heads`: λ·CE or the clipped surrogate with advantages λ·A; λ fixed, from the OCC
proxy or from exact slopes). Stopping gradients into shared parameters is the model's job
(`mtprl.model.apply_regime` reads the regime's detach switches).

Departures from the authors' implementation (MarkXCloud/RL-MTP, verl/workers/actor/megatron_actor.py),
kept small on purpose: the OCC mean is masked (theirs counts padding, see `mtprl.losses.occ`); the
fixed-λ regimes split λ₀ over the K heads as OCC does; `occ_clip` optionally clamps λ in both OCC
regimes. As in their code, λ scales the advantages inside the clipped surrogate and the dual clip is
on (c = 10) for the MTP surrogate as for the main one.

Metrics (python floats), the same keys for every regime (`mtp_metric_keys`): `mtp/loss` (the total),
`mtp/lambda_mean`, and per head k the `HEAD_METRICS` of `mtprl.losses.regimes` — among them
`mtp/{k}/proxy_c_hat`, the OCC proxy of head k's tokens under every regime. Global counts
(`global_tokens`, `global_seqs`) follow `aggregate` and may be one number for all heads or one per
head (a `[K]` tensor or a list; sum `valid_counts(mtp_mask)` over micro-batches and workers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtprl.losses._validate import as_mask, check_count, check_shape
from mtprl.losses.aggregate import Count, metrics_to_floats
from mtprl.losses.mtp_heads import HeadInputs, HeadLoss
from mtprl.losses.occ import check_occ_options, proxy_terms
from mtprl.losses.policy import DUAL_CLIP, broadcast_advantages, check_clip_range, no_clips, surrogate_metrics
from mtprl.losses.regimes import Regime, get_regime

PerHeadCount = Count | Sequence[Count] | None
# What every regime's call needs: the term's inputs and those of the per-head diagnostics.
INPUTS = ("mtp_log_prob", "mtp_mask", "log_prob", "old_log_prob", "advantages")


def _per_head(name: str, value: PerHeadCount, num_heads: int) -> list[Count | None]:
    """A global count for every head: one value for all, or a `[K]` tensor / length-K sequence."""
    if isinstance(value, Tensor) and value.ndim == 1:
        value = list(value.unbind())
    if isinstance(value, (list, tuple)):
        if len(value) != num_heads:
            raise ValueError(
                f"{name} has {len(value)} entries but there are {num_heads} MTP heads; give one per head or one for all"
            )
        for v in value:
            check_count(name, v)
        return list(value)
    if value is not None and not isinstance(value, (int, float, Tensor)):
        raise ValueError(f"{name} must be a count, one count per head, or None; got {type(value).__name__}")
    check_count(name, value)
    return [value] * num_heads


def _stacked(mtp_log_prob: Tensor, mtp_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(`[K, B, T]` log-probs, `[K, B, T]` bool mask) from `[K, B, T]` or `[B, T]` inputs."""
    if not isinstance(mtp_log_prob, Tensor) or mtp_log_prob.ndim not in (2, 3):
        got = getattr(mtp_log_prob, "shape", mtp_log_prob)
        raise ValueError(f"mtp_log_prob must be [K, B, T] (or [B, T] for one head), got {got!r}")
    mask = as_mask(mtp_mask, mtp_log_prob, name="mtp_mask", ref="mtp_log_prob")
    if mtp_log_prob.ndim == 2:
        return mtp_log_prob[None], mask[None]  # [1, B, T]
    return mtp_log_prob, mask


def _slopes(spec: Regime, slopes, num_heads: int) -> list[float] | None:
    """The exact slopes as floats, one per head, for a regime that needs them (an error otherwise)."""
    if not spec.needs_exact_slopes:
        if slopes is not None:
            raise ValueError(f"MTP regime {spec.name!r} takes no exact_slope (only regimes that need exact slopes do)")
        return None
    if slopes is None:
        raise ValueError(f"MTP regime {spec.name!r} needs exact_slope, one ⟨g_RL, g_k⟩ / (‖g_k‖² + ε) per head")
    slopes = slopes.tolist() if isinstance(slopes, Tensor) else [float(s) for s in slopes]
    if len(slopes) != num_heads:
        raise ValueError(f"exact_slope has {len(slopes)} entries but there are {num_heads} MTP heads; "
                         "give one slope per head")
    return slopes


def _prepare(spec: Regime, inputs: dict, options: dict, with_slopes: bool = True) -> tuple[HeadInputs, list[Tensor]]:
    """Check a call's inputs and options; bundle them per head with each head's OCC proxy (and its small-μ share)."""
    for name in INPUTS:
        if inputs.get(name) is None:
            raise ValueError(f"MTP regime {spec.name!r} needs {name}; pass it (every regime needs: {', '.join(INPUTS)})")
    mtp, mask = _stacked(inputs["mtp_log_prob"], inputs["mtp_mask"])
    K = mtp.shape[0]
    for name in ("log_prob", "old_log_prob"):
        check_shape(name, inputs[name], mtp.shape[1:], "one head of mtp_log_prob [K, B, T]")
    advantages = broadcast_advantages(inputs["advantages"], mtp[0])  # [B, T]
    coef = options["coef"]
    if isinstance(coef, bool) or not isinstance(coef, (int, float)):
        raise ValueError(f"coef must be a number (the base MTP coefficient λ₀, e.g. 0.1), got {coef!r}")
    clip = (options["clip_low"], options["clip_high"], options["dual_clip"])
    check_clip_range(*clip)
    estimator, occ_clip, eps = options["occ_estimator"], options["occ_clip"], options["occ_eps"]
    check_occ_options(coef, K, eps, estimator, occ_clip)
    log_prob, old = inputs["log_prob"], inputs["old_log_prob"]
    proxy = [proxy_terms(mtp[k], log_prob, old, mask[k], eps, estimator) for k in range(K)]
    return HeadInputs(
        mtp_log_prob=mtp, mtp_mask=mask, log_prob=log_prob, old_log_prob=old, advantages=advantages,
        coef=float(coef), agg=options["agg"], clip=clip, occ_clip=occ_clip,
        global_tokens=_per_head("global_tokens", options["global_tokens"], K),
        global_seqs=_per_head("global_seqs", options["global_seqs"], K),
        norm_length=options["norm_length"], proxy=[c for c, _ in proxy],
        exact_slope=_slopes(spec, inputs.get("exact_slope"), K) if with_slopes else None,
    ), [small for _, small in proxy]


def mtp_loss(
    regime: str | Regime,
    *,
    mtp_log_prob: Tensor | None = None,
    mtp_mask: Tensor | None = None,
    log_prob: Tensor | None = None,
    old_log_prob: Tensor | None = None,
    advantages: Tensor | None = None,
    coef: float = 0.1,
    agg: str = "token-mean",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = DUAL_CLIP,
    occ_estimator: str = "mean-ratio",
    occ_clip: tuple[float, float] | None = None,
    occ_eps: float = 1e-8,
    global_tokens: PerHeadCount = None,
    global_seqs: PerHeadCount = None,
    norm_length: float | None = None,
    exact_slope: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The MTP term Σ_k term_k of `regime` (a registered name or record; module docstring) and its metrics.

    Every regime needs `INPUTS` (the per-head diagnostics use them all); a regime with
    `needs_exact_slopes` also needs `exact_slope` (one per head). `occ_estimator` and `occ_eps` define
    the proxy ĉ logged under every regime (and used by occ). Returns (0-dim loss, metrics as floats);
    a regime without a term returns a 0-dim zero without graph.
    """
    spec = get_regime(regime)
    inputs = dict(mtp_log_prob=mtp_log_prob, mtp_mask=mtp_mask, log_prob=log_prob, old_log_prob=old_log_prob,
                  advantages=advantages, exact_slope=exact_slope)
    options = dict(coef=coef, agg=agg, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                       occ_estimator=occ_estimator, occ_clip=occ_clip, occ_eps=occ_eps, global_tokens=global_tokens,
                       global_seqs=global_seqs, norm_length=norm_length)
    x, small_mu = _prepare(spec, inputs, options)
    zero = x.scalar(0.0)
    total, lambdas, metrics = zero, [], {}
    for k in range(x.num_heads):
        if spec.has_term:
            lam, c_hat = spec.coefficient(x, k)
            term, clips = spec.head_loss(x, k, lam)
            total = total + term
        else:
            lam, c_hat, term, clips = zero, zero, zero, None
        log_ratio = x.log_ratio(k)
        head = {"loss": term, "lambda": lam, "c_hat": c_hat, "proxy_c_hat": x.proxy[k], "small_mu_frac": small_mu[k],
                **surrogate_metrics(log_ratio, clips if clips is not None else no_clips(log_ratio), x.mtp_mask[k], "")}
        metrics.update({f"mtp/{k}/{name}": value for name, value in head.items()})
        lambdas.append(lam)
    metrics["mtp/loss"] = total
    metrics["mtp/lambda_mean"] = torch.stack(lambdas).mean()
    return total, metrics_to_floats(metrics)


def mtp_head_losses(
    regime: str | Regime,
    *,
    mtp_log_prob: Tensor,
    mtp_mask: Tensor,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    probe: bool = False,
    agg: str = "token-mean",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = DUAL_CLIP,
    global_tokens: PerHeadCount = None,
    global_seqs: PerHeadCount = None,
    norm_length: float | None = None,
) -> list[Tensor]:
    """The per-head losses [L_1 .. L_K] at λ = 1 (with graph) of the regime's head loss, or with `probe`
    of its `probe_loss` (what the exact diagnostics measure); e.g. to feed `gradient_alignment`.
    A regime without a term gives an empty list unless `probe` is set.
    """
    spec = get_regime(regime)
    loss: HeadLoss | None = spec.probe_loss if probe else spec.head_loss
    inputs = dict(mtp_log_prob=mtp_log_prob, mtp_mask=mtp_mask, log_prob=log_prob, old_log_prob=old_log_prob,
                  advantages=advantages)
    options = dict(coef=0.0, agg=agg, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                       occ_estimator="mean-ratio", occ_clip=None, occ_eps=0.0, global_tokens=global_tokens,
                       global_seqs=global_seqs, norm_length=norm_length)
    x, _ = _prepare(spec, inputs, options, with_slopes=False)
    if loss is None:
        return []
    one = x.scalar(1.0)
    return [loss(x, k, one)[0] for k in range(x.num_heads)]
