"""`apply_regime`: set up an `MTPCausalLM` for an MTP regime, from the regime's record in `mtprl.losses`.

The one place the model is configured for a regime (the trainer and the TRL adapter both call it):
the detach switches of the MTP path (trunk hidden state, token embedding, shared output head) and
whether the MTP-only parameters require gradient. What a regime needs is data in its record
(`mtprl.losses.regimes`); nothing here depends on a regime's name.
"""

from __future__ import annotations

from mtprl.losses import Regime, get_regime
from mtprl.model.mtp import MTPCausalLM


def apply_regime(model: MTPCausalLM, regime: str | Regime) -> Regime:
    """Set `model`'s detach switches and MTP-only `requires_grad` flags for `regime`; returns its record."""
    spec = get_regime(regime)
    model.set_detach(hidden=spec.detach.hidden, embedding=spec.detach.embedding, head=spec.detach.head)
    for p in model.mtp_parameters():
        p.requires_grad_(spec.trains_mtp)
    return spec
