"""The two pieces a regime is made of: a per-head loss and a coefficient rule (DESIGN §1).

Both receive `HeadInputs`, the checked inputs of one `mtp_loss` call, and a head index k.

Head loss `(x, k, lam) -> (term_k, clips)`: head k's term *as it enters the loss*, weighted by the
detached 0-dim λ_k (with graph), and where its clipping cuts the gradient (`ClipMasks`, or None for
a term that clips nothing).
- `ce_head`         λ_k · CE of head k on the sampled tokens (−m_t, masked, reduced with `agg`)
- `surrogate_head`  the clipped surrogate of the log-ratio m_t − ℓ°_t with advantages λ_k·A, same clip
                    range, dual clip and aggregation as the main loss. This is the authors' form
                    (MarkXCloud/RL-MTP, verl/workers/actor/megatron_actor.py: `policy_loss_fn(...,
                    log_prob=mtp_log_prob, advantages=advantages*scaling)`). The clipped surrogate is
                    positively homogeneous in A, so for λ_k > 0 this is exactly λ_k·L_PG(A); for λ_k < 0
                    the clip bands and the dual clip act for −A (a trust region for the reversed step),
                    where −|λ_k|·L_PG(A) would keep pushing tokens already outside the band.
Coefficient rule `(x, k) -> (lam_k, c_hat_k)`: λ_k = (λ₀ / K)·ĉ_k as detached 0-dim tensors.
- `fixed_coefficient`  ĉ = 1                                  (detach, ce, policy)
- `proxy_coefficient`  ĉ = the OCC proxy of head k's tokens    (occ), λ clamped by `occ_clip`
- `exact_coefficient`  ĉ = the given exact slope of head k     (occ-exact), λ clamped by `occ_clip`
Splitting λ₀ over the K heads keeps the total MTP weight independent of K, as the paper's
λ_k = (λ₀/K)·ĉ_k does; we apply the same split to the fixed-λ regimes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mtprl.losses.aggregate import Count, aggregate
from mtprl.losses.occ import clamped
from mtprl.losses.policy import ClipMasks, clipped_surrogate


@dataclass(frozen=True)
class HeadInputs:
    """Checked inputs of one MTP loss call (built by `mtprl.losses.mtp`)."""

    mtp_log_prob: Tensor  # [K, B, T] head k's log-prob m_t of the sampled token y_t
    mtp_mask: Tensor  # [K, B, T] bool, where head k scores a valid response token
    log_prob: Tensor  # [B, T] main head's ℓ_t
    old_log_prob: Tensor  # [B, T] behaviour policy's ℓ°_t
    advantages: Tensor  # [B, T] A, broadcast per token and detached
    coef: float  # λ₀
    agg: str
    clip: tuple[float, float, float | None]  # clip_low, clip_high, dual_clip
    occ_clip: tuple[float, float] | None  # clamp of λ in the OCC rules
    global_tokens: list[Count | None]  # one per head
    global_seqs: list[Count | None]  # one per head
    norm_length: float | None
    proxy: list[Tensor]  # [K] × 0-dim: the OCC proxy ĉ of head k's tokens (no grad)
    exact_slope: list[float] | None  # one per head, for regimes that need exact slopes

    @property
    def num_heads(self) -> int:
        return self.mtp_log_prob.shape[0]

    @property
    def base(self) -> Tensor:
        """λ₀ / K as a 0-dim tensor: the coefficient of a head with ĉ = 1."""
        return self.scalar(self.coef / self.num_heads)

    def scalar(self, value: float) -> Tensor:
        """A 0-dim constant on the inputs' device, at least float32 (float64 inputs keep float64)."""
        dtype = torch.promote_types(self.mtp_log_prob.dtype, torch.float32)
        return torch.tensor(value, dtype=dtype, device=self.mtp_log_prob.device)

    def log_ratio(self, k: int) -> Tensor:
        """m_t − ℓ°_t of head k `[B, T]`, zero (ratio 1) outside its mask; ℓ° detached."""
        return torch.where(self.mtp_mask[k], self.mtp_log_prob[k] - self.old_log_prob.detach(), 0.0)

    def reduce(self, loss_mat: Tensor, k: int) -> Tensor:
        """`loss_mat [B, T]` reduced over head k's valid tokens with its global counts."""
        return aggregate(
            loss_mat, self.mtp_mask[k], self.agg,
            global_tokens=self.global_tokens[k], global_seqs=self.global_seqs[k], norm_length=self.norm_length,
        )


HeadLoss = Callable[[HeadInputs, int, Tensor], tuple[Tensor, ClipMasks | None]]
Coefficient = Callable[[HeadInputs, int], tuple[Tensor, Tensor]]


def ce_head(x: HeadInputs, k: int, lam: Tensor) -> tuple[Tensor, None]:
    """λ_k · cross-entropy of head k on the sampled tokens."""
    nll = torch.where(x.mtp_mask[k], -x.mtp_log_prob[k], 0.0)  # [B, T]
    return lam * x.reduce(nll, k), None


def surrogate_head(x: HeadInputs, k: int, lam: Tensor) -> tuple[Tensor, ClipMasks]:
    """The clipped surrogate of head k's log-ratio with advantages λ_k·A (module docstring)."""
    mask = x.mtp_mask[k]  # [B, T]
    adv = torch.where(mask, x.advantages * lam, 0.0)  # [B, T]
    loss_mat, clips = clipped_surrogate(x.log_ratio(k), adv, *x.clip)
    return x.reduce(loss_mat, k), clips


def fixed_coefficient(x: HeadInputs, k: int) -> tuple[Tensor, Tensor]:
    """λ_k = λ₀ / K (ĉ = 1)."""
    return x.base, x.scalar(1.0)


def proxy_coefficient(x: HeadInputs, k: int) -> tuple[Tensor, Tensor]:
    """OCC: λ_k = (λ₀ / K)·ĉ_k with ĉ_k the log-prob proxy of head k's tokens, optionally clamped."""
    c_hat = x.proxy[k]
    return clamped(x.base * c_hat, x.occ_clip), c_hat


def exact_coefficient(x: HeadInputs, k: int) -> tuple[Tensor, Tensor]:
    """occ-exact: λ_k = (λ₀ / K)·slope_k with the caller's exact slope ⟨g_RL, g_k⟩ / (‖g_k‖² + ε)."""
    c_hat = x.scalar(x.exact_slope[k])
    return clamped(x.base * c_hat, x.occ_clip), c_hat
