"""The MTP term added to the RL loss under each regime (DESIGN §1), for K heads at once.

Layout: `mtp_log_prob [K, B, T]` holds head k's log-prob m_t of the sampled token y_t, aligned to
the main head's position t; `mtp_mask [K, B, T]` marks where head k scores a valid response token
(a head of depth k cannot score the first k+1 positions). A plain `[B, T]` pair means K = 1.
`log_prob`, `old_log_prob` are the main head's `[B, T]`; `advantages` is `[B]` or `[B, T]`.

    L_MTP = Σ_k λ_k · L_k
- frozen     no term: a 0-dim zero (no graph)
- detach/ce  L_k = CE of head k on the sampled tokens (−m_t, masked, reduced with `agg`);
             λ_k = coef / K. Stopping gradients into shared parameters (detach) is the model's job.
- policy     L_k = the clipped surrogate with log-ratio m_t − ℓ°_t, same advantages, clip and
             aggregation as the main loss; λ_k = coef / K
- occ        as policy, λ_k = (coef / K) · ĉ_k from `occ_coefficient` on head k's valid tokens
- occ-exact  as policy, λ_k = (coef / K) · exact_slope[k], the slopes ⟨g_RL, g_k⟩ / (‖g_k‖² + ε)
             that the caller computed with `gradient_alignment` on L_k from `mtp_head_losses`
Splitting λ₀ = coef over the heads (the 1/K) keeps the total MTP weight independent of K, as in
the paper's λ_k = (λ₀/K)·ĉ_k; we apply the same split to the fixed-λ regimes. `occ_clip` clamps λ_k
in both OCC regimes. Departures in the OCC proxy itself are listed in `mtprl.losses.occ`.

Metrics (python floats): `mtp/loss` (the weighted total), `mtp/lambda_mean`, and per head k
`mtp/{k}/loss` (L_k, unweighted), `mtp/{k}/lambda`; `mtp/{k}/c_hat` (occ, occ-exact),
`mtp/{k}/small_mu_frac` (occ), and the surrogate metrics of `mtprl.losses.policy` for the policy
kinds (`mtp/{k}/clip_frac_low`, ...). Global counts (`global_tokens`, `global_seqs`) follow
`aggregate` and may be one number for all heads or one per head (a `[K]` tensor or a list; sum
`valid_counts(mtp_mask)` over micro-batches and workers to get the per-head ones).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from mtprl.losses._validate import as_mask, check_choice, check_count, check_shape
from mtprl.losses.aggregate import Count, aggregate, metrics_to_floats
from mtprl.losses.occ import check_occ_options, occ_terms
from mtprl.losses.policy import broadcast_advantages, check_clip_range, clipped_surrogate, surrogate_metrics

PerHeadCount = Count | Sequence[Count] | None


@dataclass(frozen=True)
class _Heads:
    """Checked inputs of one MTP loss call."""

    mtp_log_prob: Tensor  # [K, B, T]
    mtp_mask: Tensor  # [K, B, T] bool
    log_prob: Tensor | None  # [B, T]
    old_log_prob: Tensor | None  # [B, T]
    advantages: Tensor | None  # [B] or [B, T]
    coef: float
    agg: str
    clip: tuple[float, float, float | None]  # clip_low, clip_high, dual_clip
    occ: tuple[str, tuple[float, float] | None, float]  # estimator, clip, eps
    global_tokens: list[Count | None]  # one per head
    global_seqs: list[Count | None]  # one per head
    norm_length: float | None
    exact_slope: list[float] | None  # one per head

    @property
    def num_heads(self) -> int:
        return self.mtp_log_prob.shape[0]

    def scalar(self, value: float) -> Tensor:
        """A 0-dim constant on the inputs' device, at least float32 (float64 inputs keep float64)."""
        dtype = torch.promote_types(self.mtp_log_prob.dtype, torch.float32)
        return torch.tensor(value, dtype=dtype, device=self.mtp_log_prob.device)

    def reduce(self, loss_mat: Tensor, k: int) -> Tensor:
        return aggregate(
            loss_mat, self.mtp_mask[k], self.agg,
            global_tokens=self.global_tokens[k], global_seqs=self.global_seqs[k], norm_length=self.norm_length,
        )


HeadLoss = Callable[[_Heads, int], tuple[Tensor, dict[str, Tensor]]]
Coefficients = Callable[[_Heads], tuple[list[Tensor], dict[str, Tensor]]]


def _ce_head(x: _Heads, k: int) -> tuple[Tensor, dict[str, Tensor]]:
    nll = torch.where(x.mtp_mask[k], -x.mtp_log_prob[k], 0.0)  # [B, T]
    return x.reduce(nll, k), {}


def _surrogate_head(x: _Heads, k: int) -> tuple[Tensor, dict[str, Tensor]]:
    mask = x.mtp_mask[k]  # [B, T]
    log_ratio = torch.where(mask, x.mtp_log_prob[k] - x.old_log_prob.detach(), 0.0)  # [B, T]
    adv = torch.where(mask, broadcast_advantages(x.advantages, log_ratio), 0.0)  # [B, T]
    loss_mat, clips = clipped_surrogate(log_ratio, adv, *x.clip)
    return x.reduce(loss_mat, k), surrogate_metrics(log_ratio, clips, mask, prefix=f"mtp/{k}/")


def _fixed(x: _Heads) -> tuple[list[Tensor], dict[str, Tensor]]:
    lam = x.scalar(x.coef / x.num_heads)
    return [lam] * x.num_heads, {}


def _occ(x: _Heads) -> tuple[list[Tensor], dict[str, Tensor]]:
    estimator, clip, eps = x.occ
    lambdas, metrics = [], {}
    for k in range(x.num_heads):
        lam, terms = occ_terms(
            x.mtp_log_prob[k], x.log_prob, x.old_log_prob, x.mtp_mask[k], x.coef / x.num_heads, eps, estimator, clip
        )
        lambdas.append(lam)
        metrics[f"mtp/{k}/c_hat"] = terms["c_hat"]
        metrics[f"mtp/{k}/small_mu_frac"] = terms["small_mu_frac"]
    return lambdas, metrics


def _occ_exact(x: _Heads) -> tuple[list[Tensor], dict[str, Tensor]]:
    clip = x.occ[1]
    lambdas, metrics = [], {}
    for k, slope in enumerate(x.exact_slope):
        c_hat = x.scalar(slope)
        lam = c_hat * (x.coef / x.num_heads)
        lambdas.append(lam if clip is None else lam.clamp(clip[0], clip[1]))
        metrics[f"mtp/{k}/c_hat"] = c_hat
    return lambdas, metrics


class Regime(NamedTuple):
    """How one regime builds its term: per-head loss L_k, coefficients λ_k, inputs it needs."""

    head_loss: HeadLoss | None  # None: no MTP term (frozen)
    coefficients: Coefficients | None
    needs: tuple[str, ...]


_SURROGATE_NEEDS = ("mtp_log_prob", "mtp_mask", "old_log_prob", "advantages")
MTP_REGIMES: dict[str, Regime] = {
    "frozen": Regime(None, None, ()),
    "detach": Regime(_ce_head, _fixed, ("mtp_log_prob", "mtp_mask")),
    "ce": Regime(_ce_head, _fixed, ("mtp_log_prob", "mtp_mask")),
    "policy": Regime(_surrogate_head, _fixed, _SURROGATE_NEEDS),
    "occ": Regime(_surrogate_head, _occ, (*_SURROGATE_NEEDS, "log_prob")),
    "occ-exact": Regime(_surrogate_head, _occ_exact, (*_SURROGATE_NEEDS, "exact_slope")),
}


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


def _prepare(regime: str, inputs: dict, options: dict) -> tuple[Regime, _Heads | None]:
    """Look the regime up, check that it has what it needs, and bundle the inputs per head."""
    check_choice("MTP regime", regime, MTP_REGIMES)
    spec = MTP_REGIMES[regime]
    for name in spec.needs:
        if inputs.get(name) is None:
            raise ValueError(f"MTP regime {regime!r} needs {name}; pass it (needed: {', '.join(spec.needs)})")
    if spec.head_loss is None:
        return spec, None
    mtp, mask = _stacked(inputs["mtp_log_prob"], inputs["mtp_mask"])
    K = mtp.shape[0]
    for name in ("log_prob", "old_log_prob"):
        if inputs.get(name) is not None:
            check_shape(name, inputs[name], mtp.shape[1:], "one head of mtp_log_prob [K, B, T]")
    if inputs.get("advantages") is not None:
        broadcast_advantages(inputs["advantages"], mtp[0])
    coef = options["coef"]
    if isinstance(coef, bool) or not isinstance(coef, (int, float)):
        raise ValueError(f"coef must be a number (the base MTP coefficient λ₀, e.g. 0.1), got {coef!r}")
    clip = (options["clip_low"], options["clip_high"], options["dual_clip"])
    if spec.head_loss is _surrogate_head:
        check_clip_range(*clip)
    occ = (options["occ_estimator"], options["occ_clip"], options["occ_eps"])
    check_occ_options(coef, K, occ[2], occ[0], occ[1])
    slopes = inputs.get("exact_slope")
    if slopes is not None and regime == "occ-exact":
        slopes = slopes.tolist() if isinstance(slopes, Tensor) else [float(s) for s in slopes]
        if len(slopes) != K:
            raise ValueError(
                f"exact_slope has {len(slopes)} entries but there are {K} MTP heads; give one slope per head"
            )
    heads = _Heads(
        mtp_log_prob=mtp, mtp_mask=mask, log_prob=inputs.get("log_prob"), old_log_prob=inputs.get("old_log_prob"),
        advantages=inputs.get("advantages"), coef=float(coef), agg=options["agg"], clip=clip, occ=occ,
        global_tokens=_per_head("global_tokens", options["global_tokens"], K),
        global_seqs=_per_head("global_seqs", options["global_seqs"], K),
        norm_length=options["norm_length"], exact_slope=slopes,
    )
    return spec, heads


def mtp_loss(
    regime: str,
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
    dual_clip: float | None = None,
    occ_estimator: str = "mean-ratio",
    occ_clip: tuple[float, float] | None = None,
    occ_eps: float = 1e-8,
    global_tokens: PerHeadCount = None,
    global_seqs: PerHeadCount = None,
    norm_length: float | None = None,
    exact_slope: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The MTP term Σ_k λ_k · L_k of `regime` (see the module docstring) and its metrics.

    Needed inputs: frozen none; detach/ce mtp_log_prob, mtp_mask; policy also old_log_prob and
    advantages; occ also log_prob; occ-exact also exact_slope (one per head). Returns (0-dim loss,
    metrics as python floats).
    """
    inputs = dict(mtp_log_prob=mtp_log_prob, mtp_mask=mtp_mask, log_prob=log_prob, old_log_prob=old_log_prob,
                  advantages=advantages, exact_slope=exact_slope)
    options = dict(coef=coef, agg=agg, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                   occ_estimator=occ_estimator, occ_clip=occ_clip, occ_eps=occ_eps, global_tokens=global_tokens,
                   global_seqs=global_seqs, norm_length=norm_length)
    spec, x = _prepare(regime, inputs, options)
    if x is None:
        zero = mtp_log_prob.new_zeros(()) if isinstance(mtp_log_prob, Tensor) else torch.zeros(())
        return zero, {"mtp/loss": 0.0, "mtp/lambda_mean": 0.0}
    lambdas, metrics = spec.coefficients(x)
    total = mtp_log_prob.new_zeros(())
    for k, lam in enumerate(lambdas):
        loss_k, head_metrics = spec.head_loss(x, k)
        total = total + lam * loss_k
        metrics.update({f"mtp/{k}/loss": loss_k, f"mtp/{k}/lambda": lam, **head_metrics})
    metrics["mtp/loss"] = total
    metrics["mtp/lambda_mean"] = torch.stack(lambdas).mean()
    return total, metrics_to_floats(metrics)


def mtp_head_losses(
    regime: str,
    *,
    mtp_log_prob: Tensor,
    mtp_mask: Tensor,
    old_log_prob: Tensor | None = None,
    advantages: Tensor | None = None,
    agg: str = "token-mean",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    global_tokens: PerHeadCount = None,
    global_seqs: PerHeadCount = None,
    norm_length: float | None = None,
) -> list[Tensor]:
    """The unweighted per-head losses [L_1 .. L_K] of `regime` (with graph), e.g. to feed
    `gradient_alignment` for the `occ-exact` slopes; `frozen` gives an empty list.
    """
    if regime == "frozen":
        return []
    kind = "policy" if regime in ("occ", "occ-exact") else regime
    inputs = dict(mtp_log_prob=mtp_log_prob, mtp_mask=mtp_mask, old_log_prob=old_log_prob, advantages=advantages)
    options = dict(coef=0.0, agg=agg, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                   occ_estimator="mean-ratio", occ_clip=None, occ_eps=0.0, global_tokens=global_tokens,
                   global_seqs=global_seqs, norm_length=norm_length)
    spec, x = _prepare(kind, inputs, options)
    return [spec.head_loss(x, k)[0] for k in range(x.num_heads)]
