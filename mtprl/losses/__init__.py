"""Pure loss maths of mtprl (DESIGN §1): tensors and floats in, `(loss, metrics)` out.

- advantages: `group_advantages` (GRPO / Dr. GRPO), `rloo_advantages`
- aggregate:  `aggregate` (token-mean, seq-mean-token-mean, seq-mean-token-sum,
              seq-mean-token-sum-norm; global counts for micro-batches and data parallelism), `valid_counts`
- policy:     `clipped_surrogate` (per-token matrix), `policy_loss` (the main RL loss L_RL)
- kl:         `kl_estimate` (k1, k2, k3), `kl_loss`
- occ:        `occ_coefficient` (the OCC proxy λ), `gradient_alignment` (exact gradient diagnostics)
- mtp:        `mtp_loss` (frozen, detach, ce, policy, occ, occ-exact), `mtp_head_losses`

Conventions: per-token tensors `[B, T]`, MTP per-head tensors `[K, B, T]`; masks are bool or 0/1
and masked positions never matter, whatever they hold; metrics are python floats (one device sync
per call). Departures from the paper and its reference code, detailed in each module's docstring:
the OCC mean is masked (the reference code counts padding in it); `ratio-of-sums` and a λ clip are
offered beside the paper's mean of ratios; `occ-exact` (exact gradient slope) is our oracle;
the fixed-λ regimes split λ₀ over the K heads like OCC does; seq-mean-token-sum-norm averages over
sequences (verl's version does not); a group of one response gets advantage 0.
"""

from mtprl.losses.advantages import ADVANTAGE_SCALES, group_advantages, rloo_advantages
from mtprl.losses.aggregate import AGG_MODES, aggregate, valid_counts
from mtprl.losses.kl import KL_ESTIMATORS, kl_estimate, kl_loss
from mtprl.losses.mtp import MTP_REGIMES, mtp_head_losses, mtp_loss
from mtprl.losses.occ import OCC_ESTIMATORS, gradient_alignment, occ_coefficient
from mtprl.losses.policy import LOG_RATIO_CLAMP, ClipMasks, clipped_surrogate, policy_loss

__all__ = [
    "ADVANTAGE_SCALES",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "MTP_REGIMES",
    "OCC_ESTIMATORS",
    "ClipMasks",
    "aggregate",
    "clipped_surrogate",
    "gradient_alignment",
    "group_advantages",
    "kl_estimate",
    "kl_loss",
    "mtp_head_losses",
    "mtp_loss",
    "occ_coefficient",
    "policy_loss",
    "rloo_advantages",
    "valid_counts",
]
