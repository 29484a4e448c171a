"""Optimal Coefficient Calibration (OCC): the per-head MTP loss weight λ_k, proxy and exact.

Proxy (arXiv 2605.28184; DESIGN §1). Per valid token t of head k, without gradient:
    δ_t = ℓ_t − ℓ°_t   (main head's move since the rollout),   μ_t = m_t − ℓ°_t (MTP head vs behaviour)
    λ_k = (λ₀ / K) · ĉ_k,   ĉ_k = mean_t δ_t·μ_t / (μ_t² + ε)      ("mean-ratio", the paper's)
Exact (the `occ-exact` oracle): ĉ = ⟨g_RL, g_MTP⟩ / (‖g_MTP‖² + ε) on the shared parameters, from
two `torch.autograd.grad` calls (`gradient_alignment`).

Departures from the paper / its reference code:
- The mean over tokens is a *masked* mean over the head's valid tokens. The authors' reference code
  takes an unmasked mean, so padding counts in the denominator and shrinks λ with the padding ratio.
- Besides the mean of ratios, "ratio-of-sums" Σδμ / (Σμ² + ε): the least-squares slope of δ on μ
  (through the origin), which stays bounded when some μ_t ≈ 0 where the per-token ratio explodes.
- `clip=(lo, hi)` optionally clamps λ. The defaults ("mean-ratio", no clip) reproduce the paper.
- The exact-slope oracle is ours, to validate the proxy.
On the first optimiser step after a rollout δ ≡ 0, so λ = 0: OCC acts from the second mini-batch on.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from mtprl.losses._validate import as_mask, check_choice, check_ndim, check_non_negative, check_range, check_shape
from mtprl.losses.aggregate import masked_mean, metrics_to_floats

OCC_ESTIMATORS = ("mean-ratio", "ratio-of-sums")
SMALL_MU = 1e-6


def check_occ_options(
    base: float, num_heads: int, eps: float, estimator: str, clip: tuple[float, float] | None
) -> None:
    """Raise on an unknown estimator, num_heads < 1, eps < 0, a non-number base or a bad clip pair."""
    check_choice("OCC estimator", estimator, OCC_ESTIMATORS)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1 (the number of MTP heads K), got {num_heads!r}")
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        raise ValueError(f"base must be a number (the base coefficient λ₀, e.g. 0.1), got {base!r}")
    check_non_negative("eps", eps)
    check_range("clip", clip)


def _displacements(mtp_log_prob: Tensor, log_prob: Tensor, old_log_prob: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(δ, μ) `[B, T]`, 0 outside `mask`, in log_prob's dtype promoted to float32."""
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    old = old_log_prob.to(dtype)
    return torch.where(mask, log_prob.to(dtype) - old, 0.0), torch.where(mask, mtp_log_prob.to(dtype) - old, 0.0)


def _sums(delta: Tensor, mu: Tensor, mask: Tensor, eps: float) -> Tensor:
    ratio = torch.where(mask, delta * mu / (mu.square() + eps), 0.0)  # [B, T]
    return torch.stack([ratio.sum(), mask.sum().to(delta.dtype), (delta * mu).sum(), mu.square().sum()])


def proxy_sums(mtp_log_prob: Tensor, log_prob: Tensor, old_log_prob: Tensor, mask: Tensor, eps: float) -> Tensor:
    """The OCC proxy's sufficient statistics over the valid tokens (bool `mask`) of `[B, T]` inputs, detached:
    [Σ δμ/(μ²+ε), number of valid tokens, Σ δμ, Σ μ²] (float32, or the inputs' wider dtype).

    The sums of several micro-batches or workers add up to those of their union (sum them, over ranks with an
    all-reduce), and `proxy_from_sums` gives ĉ of the union under either estimator: the one implementation of
    the proxy behind `occ_coefficient` and the exact diagnostics' `proxy_*` figures. Inputs are not checked.
    """
    with torch.no_grad():
        return _sums(*_displacements(mtp_log_prob, log_prob, old_log_prob, mask), mask, eps)


def proxy_from_sums(sums: Tensor, estimator: str, eps: float) -> Tensor:
    """ĉ (0-dim) from `proxy_sums` [4] (or their total): the masked mean of δμ/(μ²+ε) ("mean-ratio", 0 without a
    valid token) or Σδμ / (Σμ² + ε) ("ratio-of-sums")."""
    if estimator == "mean-ratio":
        return sums[0] / sums[1].clamp(min=1)
    return sums[2] / (sums[3] + eps)


def proxy_terms(
    mtp_log_prob: Tensor, log_prob: Tensor, old_log_prob: Tensor, mask: Tensor, eps: float, estimator: str
) -> tuple[Tensor, Tensor]:
    """(ĉ, fraction of valid tokens with |μ| < 1e-6) as detached 0-dim tensors; inputs `[B, T]`, all checked."""
    with torch.no_grad():
        delta, mu = _displacements(mtp_log_prob, log_prob, old_log_prob, mask)  # [B, T] each
        c_hat = proxy_from_sums(_sums(delta, mu, mask, eps), estimator, eps)
        small = masked_mean(mu.abs() < SMALL_MU, mask)
    return c_hat, small


def clamped(lam: Tensor, clip: tuple[float, float] | None) -> Tensor:
    """λ clamped to `clip = (lo, hi)`, or unchanged without a clip."""
    return lam if clip is None else lam.clamp(clip[0], clip[1])


def occ_coefficient(
    mtp_log_prob: Tensor,
    log_prob: Tensor,
    old_log_prob: Tensor,
    mask: Tensor,
    base: float = 0.1,
    num_heads: int = 1,
    eps: float = 1e-8,
    estimator: str = "mean-ratio",
    clip: tuple[float, float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """OCC λ for one MTP head: a detached 0-dim tensor (base / num_heads) · ĉ, optionally clamped.

    All tensors `[B, T]`; `mask` marks the head's valid tokens. ĉ is the masked mean of
    δμ / (μ² + eps) ("mean-ratio") or Σδμ / (Σμ² + eps) ("ratio-of-sums"); 0 with no valid token.
    Metrics: c_hat, lambda, small_mu_frac (fraction of valid tokens with |μ| < 1e-6).
    """
    check_occ_options(base, num_heads, eps, estimator, clip)
    check_ndim("log_prob", log_prob, 2, "[B, T]")
    check_shape("old_log_prob", old_log_prob, log_prob.shape, "log_prob")
    check_shape("mtp_log_prob", mtp_log_prob, log_prob.shape, "log_prob")
    mask = as_mask(mask, log_prob)
    c_hat, small = proxy_terms(mtp_log_prob, log_prob, old_log_prob, mask, eps, estimator)
    lam = clamped(c_hat * (base / num_heads), clip)
    return lam, metrics_to_floats({"c_hat": c_hat, "lambda": lam, "small_mu_frac": small})


def _flat_grads(loss: Tensor, params: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """d loss / d p for each p, as `dtype`; zeros where p gets no gradient or does not require one."""
    wanted = [i for i, p in enumerate(params) if p.requires_grad]
    grads: list[Tensor | None] = [None] * len(params)
    if loss.requires_grad and wanted:
        found = torch.autograd.grad(loss, [params[i] for i in wanted], retain_graph=True, allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g
    return [torch.zeros_like(p, dtype=dtype) if g is None else g.to(dtype) for p, g in zip(params, grads)]


def gradient_alignment(
    params: Iterable[Tensor], loss_rl: Tensor, loss_mtp: Tensor, eps: float = 1e-8
) -> dict[str, float]:
    """Exact alignment of the RL and MTP gradients on `params` (the shared parameters θ_s).

    Two `torch.autograd.grad` calls with retain_graph=True: nothing is written to `.grad` and both
    graphs stay alive for the later backward. A parameter that one loss does not reach (or that does
    not require grad) contributes zeros. Returns python floats: dot ⟨g_RL, g_MTP⟩, rl_sq_norm ‖g_RL‖²,
    mtp_sq_norm ‖g_MTP‖², cosine (0 if either gradient is zero), slope ⟨g_RL, g_MTP⟩ / (‖g_MTP‖² + eps),
    the exact ĉ of the `occ-exact` regime.
    """
    params = list(params)
    if not params:
        raise ValueError("gradient_alignment needs at least one parameter (the shared parameters θ_s)")
    for name, loss in (("loss_rl", loss_rl), ("loss_mtp", loss_mtp)):
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise ValueError(f"{name} must be a 0-dim loss tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
    check_non_negative("eps", eps)
    dtype = torch.promote_types(params[0].dtype, torch.float32)
    g_rl = _flat_grads(loss_rl, params, dtype)
    g_mtp = _flat_grads(loss_mtp, params, dtype)
    dot = sum((a * b).sum() for a, b in zip(g_rl, g_mtp))
    rl_sq = sum(a.square().sum() for a in g_rl)
    mtp_sq = sum(b.square().sum() for b in g_mtp)
    norms = rl_sq.sqrt() * mtp_sq.sqrt()
    cosine = torch.where(norms > 0, dot / norms.clamp(min=torch.finfo(dtype).tiny), 0.0)
    metrics = {"dot": dot, "rl_sq_norm": rl_sq, "mtp_sq_norm": mtp_sq, "cosine": cosine, "slope": dot / (mtp_sq + eps)}
    return metrics_to_floats(metrics)



def exact_slopes(params: Iterable[Tensor], loss_rl: Tensor, head_losses: list[Tensor], eps: float = 1e-8) -> list[float]:
    """The `occ-exact` slopes ⟨g_RL, g_k⟩ / (‖g_k‖² + eps) on `params`, one per head loss (graphs kept)."""
    params = list(params)
    return [gradient_alignment(params, loss_rl, head, eps=eps)["slope"] for head in head_losses]
