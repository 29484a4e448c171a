"""The regime registry: one frozen record per MTP regime, the one place a regime name is looked up.

Everything a regime implies is data in its `Regime` record: its head loss and coefficient rule
(`mtprl.losses.mtp_heads`), where the MTP path stops gradient into the shared parameters, whether
the MTP-only parameters train, whether the trainer must measure exact slopes before the loss, which
loss the exact diagnostics probe, and whether λ comes from the policy's drift δ = ℓ − ℓ°. Every
regime emits the same metric keys (`mtp_metric_keys`). Callers look a name up with `get_regime`;
`mtprl.model.apply_regime` sets the model's detach switches and trainable flags from the record.

| regime          | term                      | detached on the MTP path          | MTP params |
|-----------------|---------------------------|-----------------------------------|------------|
| frozen          | none                      | all (no term anyway)              | fixed      |
| detach          | λ·CE                      | trunk hidden state, embedding     | trained    |
| detach-mtp-only | λ·CE                      | hidden state, embedding, out head | trained    |
| ce              | λ·CE                      | nothing                           | trained    |
| policy          | L_PG(λ·A), λ = λ₀/K       | nothing                           | trained    |
| occ             | L_PG(λ·A), λ = (λ₀/K)·ĉ   | nothing                           | trained    |
| occ-exact       | L_PG(λ·A), λ from slopes  | nothing                           | trained    |

`detach` is the authors' baseline (MarkXCloud/RL-MTP, `detach_encoder=True`: the trunk hidden state
and the token embedding are detached, the shared output head stays on the graph and is trained by
the MTP cross-entropy). `detach-mtp-only` trains the MTP-only parameters alone, so the main head takes
exactly `frozen`'s step (verl's documented MTP mode). With tied embeddings the tied matrix is the
output head, so under `detach` it is trained through its head role only.

Adding a regime is one `register_regime` call, with a new head loss or coefficient rule if the
existing ones do not fit (README, Architecture).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtprl.losses._validate import check_choice
from mtprl.losses.mtp_heads import (
    Coefficient, HeadLoss, ce_head, exact_coefficient, fixed_coefficient, proxy_coefficient, surrogate_head,
)
from mtprl.losses.policy import SURROGATE_METRICS


@dataclass(frozen=True)
class Detach:
    """Where the MTP path stops gradient into the shared parameters θ_s."""

    hidden: bool = False  # the trunk hidden state fed to depth 1
    embedding: bool = False  # the token-embedding lookups of the MTP path
    head: bool = False  # the shared output head applied to MTP states


@dataclass(frozen=True)
class Regime:
    """What one MTP regime is: its term, how it touches the model, and what the trainer must do for it."""

    name: str
    head_loss: HeadLoss | None  # head k's λ-weighted term; None: no MTP term
    coefficient: Coefficient | None  # λ_k and ĉ_k; None exactly when head_loss is None
    detach: Detach = field(default_factory=Detach)  # gradient stops on the MTP path
    trains_mtp: bool = True  # the MTP-only parameters φ get gradient (False: fixed, no term)
    needs_exact_slopes: bool = False  # the caller passes ⟨g_RL, g_k⟩ / (‖g_k‖² + ε) per head as exact_slope
    uses_drift: bool = False  # λ comes from δ = ℓ − ℓ°, hence is 0 on the first optimiser step after a rollout
    probe_loss: HeadLoss = surrogate_head  # the head loss whose gradient the exact diagnostics measure
    summary: str = ""  # one line for help texts and tables

    def __post_init__(self):
        if (self.head_loss is None) != (self.coefficient is None):
            raise ValueError(f"regime {self.name!r}: give both a head loss and a coefficient rule, or neither")
        if self.head_loss is None and self.trains_mtp:
            raise ValueError(f"regime {self.name!r} has no MTP term, so its MTP parameters cannot train: "
                             "set trains_mtp=False (AdamW's weight decay would otherwise still move them)")
        if self.head_loss is None and self.needs_exact_slopes:
            raise ValueError(f"regime {self.name!r} has no MTP term to scale with exact slopes")

    @property
    def has_term(self) -> bool:
        return self.head_loss is not None


MTP_REGIMES: dict[str, Regime] = {}

# Per-head metrics every regime emits as `mtp/{k}/{name}` (the same set for every regime):
# loss       head k's term as it enters the loss (λ-weighted; Σ_k = mtp/loss)
# lambda     λ_k used;  c_hat  ĉ_k with λ_k = (λ₀/K)·ĉ_k (1 for fixed λ, 0 without a term)
# proxy_c_hat, small_mu_frac  the OCC proxy of head k's tokens (under every regime) and its |μ| < 1e-6 share
# SURROGATE_METRICS  clip fractions of the term (0 where it clips nothing) and the MTP ratio's statistics
HEAD_METRICS = ("loss", "lambda", "c_hat", "proxy_c_hat", "small_mu_frac", *SURROGATE_METRICS)
TOTAL_METRICS = ("mtp/loss", "mtp/lambda_mean")


def mtp_metric_keys(num_heads: int) -> frozenset[str]:
    """The metric keys `mtp_loss` returns for `num_heads` heads, whatever the regime."""
    return frozenset(TOTAL_METRICS) | {f"mtp/{k}/{name}" for k in range(num_heads) for name in HEAD_METRICS}


def register_regime(
    name: str,
    head_loss: HeadLoss | None,
    coefficient: Coefficient | None,
    *,
    detach: Detach | None = None,
    trains_mtp: bool = True,
    needs_exact_slopes: bool = False,
    uses_drift: bool = False,
    probe_loss: HeadLoss = surrogate_head,
    summary: str = "",
) -> Regime:
    """Add a regime to `MTP_REGIMES` (refusing a name that is taken) and return its record."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"a regime name must be a non-empty string without surrounding spaces, got {name!r}")
    if name in MTP_REGIMES:
        raise ValueError(f"MTP regime {name!r} is already registered; choose another name")
    regime = Regime(name, head_loss, coefficient, detach=detach or Detach(), trains_mtp=trains_mtp,
                    needs_exact_slopes=needs_exact_slopes, uses_drift=uses_drift, probe_loss=probe_loss,
                    summary=summary)
    MTP_REGIMES[name] = regime
    return regime


def get_regime(regime: str | Regime) -> Regime:
    """The record of a registered regime name (a record is returned as it is); a clear error otherwise."""
    if isinstance(regime, Regime):
        return regime
    check_choice("MTP regime", regime, MTP_REGIMES)
    return MTP_REGIMES[regime]


register_regime("frozen", None, None, detach=Detach(hidden=True, embedding=True, head=True), trains_mtp=False,
                summary="no MTP term; the MTP layers stay fixed")
register_regime("detach", ce_head, fixed_coefficient, detach=Detach(hidden=True, embedding=True),
                summary="λ·CE with the trunk hidden state and embedding detached; the shared output head is "
                        "trained by it (the authors' baseline)")
register_regime("detach-mtp-only", ce_head, fixed_coefficient, detach=Detach(hidden=True, embedding=True, head=True),
                summary="λ·CE on the MTP-only parameters (the main head takes frozen's step)")
register_regime("ce", ce_head, fixed_coefficient, probe_loss=ce_head,
                summary="λ·CE with full gradient into the shared parameters")
register_regime("policy", surrogate_head, fixed_coefficient,
                summary="the clipped surrogate of the MTP head with advantages λ·A, fixed λ = λ₀/K")
register_regime("occ", surrogate_head, proxy_coefficient, uses_drift=True,
                summary="as policy, λ = (λ₀/K)·ĉ from the log-prob proxy (OCC)")
register_regime("occ-exact", surrogate_head, exact_coefficient, needs_exact_slopes=True,
                summary="as policy, λ = (λ₀/K)·⟨g_RL, g_k⟩/‖g_k‖² from two extra backward passes (an oracle)")
