"""Pure loss maths of mtprl (DESIGN §1): tensors and floats in, `(loss, metrics)` out.

- advantages: `group_advantages` (GRPO / Dr. GRPO), `rloo_advantages`
- aggregate:  `aggregate` (token-mean, seq-mean-token-mean, seq-mean-token-sum,
              seq-mean-token-sum-norm; global counts for micro-batches and data parallelism), `valid_counts`
- policy:     `clipped_surrogate` (per-token matrix), `policy_loss` (the main RL loss L_RL)
- kl:         `kl_estimate` (k1, k2, k3), `kl_loss`
- occ:        `occ_coefficient` (the OCC proxy λ), `gradient_alignment`, `exact_slopes` (exact gradient terms)
- regimes:    `MTP_REGIMES` (one frozen `Regime` record per regime), `register_regime`, `get_regime`,
              `mtp_metric_keys`: the one seam where a regime name is looked up
- mtp_heads:  the pieces of a regime: head losses (`ce_head`, `surrogate_head`) and coefficient rules
              (`fixed_coefficient`, `proxy_coefficient`, `exact_coefficient`) on `HeadInputs`
- mtp:        `mtp_loss` (the MTP term of any registered regime), `mtp_head_losses`

Conventions: per-token tensors `[B, T]`, MTP per-head tensors `[K, B, T]`; masks are bool or 0/1
and masked positions never matter, whatever they hold; metrics are python floats (one device sync
per call). Departures from the paper and its reference code (MarkXCloud/RL-MTP), detailed in each module's
docstring: the OCC mean is masked (the reference code counts padding in it); `ratio-of-sums` and a λ
clip are offered beside the paper's mean of ratios; `occ-exact` (exact gradient slope) is our oracle;
the fixed-λ regimes split λ₀ over the K heads like OCC does; seq-mean-token-sum-norm averages over
sequences (verl's version does not); a group of one response gets advantage 0. As in the reference
code, λ scales the advantages inside the MTP surrogate, the dual clip is on (c = 10), and `detach`
keeps the shared output head on the MTP path (`detach-mtp-only` is the variant that does not).
"""

from mtprl.losses.advantages import ADVANTAGE_SCALES, group_advantages, rloo_advantages
from mtprl.losses.aggregate import AGG_MODES, aggregate, valid_counts
from mtprl.losses.kl import KL_ESTIMATORS, kl_estimate, kl_loss
from mtprl.losses.mtp import mtp_head_losses, mtp_loss
from mtprl.losses.mtp_heads import (
    HeadInputs, ce_head, exact_coefficient, fixed_coefficient, proxy_coefficient, surrogate_head,
)
from mtprl.losses.occ import OCC_ESTIMATORS, exact_slopes, gradient_alignment, occ_coefficient
from mtprl.losses.policy import DUAL_CLIP, LOG_RATIO_CLAMP, SURROGATE_METRICS, ClipMasks, clipped_surrogate, policy_loss
from mtprl.losses.regimes import (
    HEAD_METRICS, MTP_REGIMES, TOTAL_METRICS, Detach, Regime, get_regime, mtp_metric_keys, register_regime,
)

__all__ = [
    "ADVANTAGE_SCALES", "AGG_MODES", "DUAL_CLIP", "HEAD_METRICS", "KL_ESTIMATORS", "LOG_RATIO_CLAMP", "MTP_REGIMES",
    "OCC_ESTIMATORS", "SURROGATE_METRICS", "TOTAL_METRICS", "ClipMasks", "Detach", "HeadInputs", "Regime",
    "aggregate", "ce_head", "clipped_surrogate", "exact_coefficient", "exact_slopes", "fixed_coefficient", "get_regime",
    "gradient_alignment", "group_advantages", "kl_estimate", "kl_loss", "mtp_head_losses", "mtp_loss",
    "mtp_metric_keys", "occ_coefficient", "policy_loss", "proxy_coefficient", "register_regime", "rloo_advantages",
    "surrogate_head", "valid_counts",
]
