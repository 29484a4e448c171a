"""Held-out gradient decomposition: split-half inner products, Euclidean and AdamW-preconditioned.

Same-sample bias. With ĝ_RL and ĝ_MTP estimated on the same tokens,
    E⟨ĝ_RL, ĝ_MTP⟩ = ⟨g_RL, g_MTP⟩ + tr Cov(ĝ_RL, ĝ_MTP),
and on a small batch the covariance term can dominate. With gradients from two disjoint halves A, B
of the batch (independent given the parameters: split by prompt group),
    dot = ½(⟨r_A, m_B⟩ + ⟨r_B, m_A⟩)
has expectation ⟨g_RL, g_MTP⟩, and ⟨r_A, r_B⟩, ⟨m_A, m_B⟩ are unbiased estimates of ‖g_RL‖², ‖g_MTP‖²
(they can come out negative when the signal is below the noise). The same-batch figures of the whole
batch, r = w_A r_A + w_B r_B (w the halves' shares of the loss normaliser), are returned beside them
(`same_*`) so the bias is visible.

Geometry. The update is AdamW: a gradient g moves θ by about −η P g, P = diag(1 / (√v̂ + ε)) with v̂ the
bias-corrected second moment (`adam_preconditioner`; the current gradient's own contribution to v̂ and
the momentum's spreading of g over later steps are ignored, weight decay does not depend on λ, and
gradient clipping is ignored). One step on L_RL + λ·L_MTP changes L_RL by
    −ηλ⟨g_RL, P g_MTP⟩ + ½η²λ²‖P g_MTP‖²_H + (terms without λ) + η²λ·(P g_RL)ᵀ H (P g_MTP),
and, dropping the cross term as DESIGN §1 does, the best λ is
    λ* = ⟨g_RL, P g_MTP⟩ / (η ‖P g_MTP‖²_H).
H approximation: the identity (H ≈ I), so ‖P g_MTP‖²_H ≈ ‖P g_MTP‖². No Gauss-Newton product is
formed; λ* is therefore a scale-free *sign and ordering* statistic, not a calibrated coefficient.

All inner products over parameter lists go through `grad_dot`, the one place a sharded trainer
needs to reduce a local partial sum over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Grads = Sequence[Tensor]
# The reduction of a local partial inner product over ranks (identity when every rank holds whole gradients).
Reduce = Callable[[Tensor], Tensor]


def grad_dot(a: Grads, b: Grads, weight: Grads | None = None, reduce: Reduce | None = None) -> Tensor:
    """Σ_p ⟨a_p, w_p ⊙ b_p⟩ over parameter tensors as a float64 0-dim tensor (w = 1 without `weight`).

    With sharded parameters each rank holds shards of a, b, w: pass `reduce` (an all-reduce sum) so
    every rank gets the full inner product.
    """
    if len(a) != len(b) or (weight is not None and len(weight) != len(a)):
        raise ValueError(f"grad_dot needs lists of equal length, got {len(a)}, {len(b)}"
                         + ("" if weight is None else f", {len(weight)}"))
    total = torch.zeros((), dtype=torch.float64, device=a[0].device if len(a) else None)
    for i, (x, y) in enumerate(zip(a, b)):
        prod = x.double() * y.double()
        if weight is not None:
            prod = prod * weight[i].double()
        total = total + prod.sum()
    return reduce(total) if reduce is not None else total


def adam_preconditioner(exp_avg_sq: Tensor, step: float, beta2: float, eps: float) -> Tensor:
    """Adam's diagonal preconditioner 1 / (√(v / (1 − β₂^t)) + ε) for a parameter's state (v, t)."""
    if step < 1:
        raise ValueError(f"the Adam state has step {step}; a preconditioner needs at least one optimiser step")
    v_hat = exp_avg_sq.double() / (1.0 - beta2 ** step)
    return 1.0 / (v_hat.sqrt() + eps)


def split_half_terms(rl_a: Grads, rl_b: Grads, mtp_a: Grads, mtp_b: Grads, weight_a: float | tuple[float, float],
                     precond: Grads | None = None, lr: float | None = None, eps: float = 1e-8,
                     reduce: Reduce | None = None) -> dict[str, float]:
    """Held-out and same-batch decomposition terms from the gradients of two disjoint halves.

    `weight_a` ∈ [0, 1]: half A's share of the whole batch's loss normaliser (its share of the valid
    tokens under token-mean), so the whole batch's gradient is w·g_A + (1 − w)·g_B; a pair gives the
    shares of the RL and the MTP loss apart (their tokens differ). `precond` is P
    per parameter (AdamW, `adam_preconditioner`), `lr` the η of λ*; without `precond` only the
    Euclidean terms are returned. Keys (module docstring):
      Euclidean: dot, g_rl_sq, g_mtp_sq (split-half), same_dot, same_g_rl_sq, same_g_mtp_sq (whole batch),
                 cos = dot / (‖r‖‖m‖) and slope = dot / (‖m‖² + eps) with whole-batch norms
      AdamW:     pdot = ½(⟨r_A, P m_B⟩ + ⟨r_B, P m_A⟩), pg_mtp_sq = ⟨P m_A, P m_B⟩ (split-half),
                 same_pdot, same_pg_mtp_sq = ‖P m‖², pslope = pdot / (‖P m‖² + eps),
                 lambda_star = pdot / (η‖P m‖² + eps) (H ≈ I), same_lambda_star likewise
    """
    w_rl, w_mtp = weight_a if isinstance(weight_a, tuple) else (weight_a, weight_a)
    for w in (w_rl, w_mtp):
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"weight_a must lie in [0, 1] (half A's share of the batch), got {weight_a}")
    rl = [w_rl * x + (1.0 - w_rl) * y for x, y in zip(rl_a, rl_b)]
    mtp = [w_mtp * x + (1.0 - w_mtp) * y for x, y in zip(mtp_a, mtp_b)]

    def dot(a, b, w=None):
        return grad_dot(a, b, w, reduce)

    out = {"dot": 0.5 * (dot(rl_a, mtp_b) + dot(rl_b, mtp_a)), "g_rl_sq": dot(rl_a, rl_b),
           "g_mtp_sq": dot(mtp_a, mtp_b), "same_dot": dot(rl, mtp), "same_g_rl_sq": dot(rl, rl),
           "same_g_mtp_sq": dot(mtp, mtp)}
    norms = (out["same_g_rl_sq"] * out["same_g_mtp_sq"]).sqrt()
    out["cos"] = torch.where(norms > 0, out["dot"] / norms.clamp(min=1e-300), 0.0)
    out["slope"] = out["dot"] / (out["same_g_mtp_sq"] + eps)
    if precond is not None:
        if lr is None or lr <= 0:
            raise ValueError(f"lambda_star needs the learning rate η > 0, got {lr}")
        squared = [p.square() for p in precond]
        out.update(pdot=0.5 * (dot(rl_a, mtp_b, precond) + dot(rl_b, mtp_a, precond)),
                   pg_mtp_sq=dot(mtp_a, mtp_b, squared), same_pdot=dot(rl, mtp, precond),
                   same_pg_mtp_sq=dot(mtp, mtp, squared))
        out["pslope"] = out["pdot"] / (out["same_pg_mtp_sq"] + eps)
        out["lambda_star"] = out["pdot"] / (lr * out["same_pg_mtp_sq"] + eps)
        out["same_lambda_star"] = out["same_pdot"] / (lr * out["same_pg_mtp_sq"] + eps)
    return {k: float(v) for k, v in out.items()}
