"""The exact gradient decomposition on the shared parameters, measured for every regime (DESIGN §1).

On one micro-batch (this worker's first of the given mini-batch, at the current parameters,
before the mini-batch's update) we compute g_RL = ∇θ_s L_RL and, per head k, g_k = ∇θ_s L_k with
`gradient_alignment`, and log ⟨g_RL, g_k⟩, ‖g_RL‖², ‖g_k‖², their cosine and the slope
⟨g_RL, g_k⟩ / (‖g_k‖² + ε) (the exact ĉ), beside the OCC proxy ĉ of the same tokens.

The probe loss L_k is the regime's `probe_loss` (its record in `mtprl.losses.regimes`): the clipped
surrogate for the policy-form regimes and also for `frozen` and the detach regimes (whose own term
sends little or nothing to θ_s, so we measure what the policy-form term *would* send: the
decomposition stays comparable across regimes); cross-entropy for `ce`. The probe runs its own forward pass with every detach switch
off and only calls `torch.autograd.grad`, so it writes no `.grad`, draws no random numbers, and
leaves the update unchanged. Losses are micro-batch means; with several workers the values are
averaged over workers.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import Tensor

from mtprl.losses import gradient_alignment, mtp_head_losses, occ_coefficient, policy_loss
from mtprl.train.batch import TrainBatch, micro_batches, response_log_probs
from mtprl.train.distributed import Dist

_NAMES = {"dot": "dot", "rl_sq_norm": "g_rl_sq", "mtp_sq_norm": "g_mtp_sq", "cosine": "cos", "slope": "slope"}


@contextlib.contextmanager
def detach_off(model):
    """Temporarily switch every detach switch of the MTP path off."""
    saved = dataclasses.replace(model.detach)
    model.set_detach(hidden=False, embedding=False, head=False)
    try:
        yield model
    finally:
        model.set_detach(hidden=saved.hidden, embedding=saved.embedding, head=saved.head)


def exact_terms(model, batch: TrainBatch, rows: Tensor, cfg, dist: Dist) -> dict[str, float]:
    """`exact/{k}/{dot, g_rl_sq, g_mtp_sq, cos, slope, proxy_c_hat}` on the first micro-batch of `rows`."""
    mb = batch.select(micro_batches(rows, dist, cfg.micro_batch_size)[0])
    out: dict[str, float] = {}
    with detach_off(model):
        lp = response_log_probs(model, mb, cfg.temperature, mtp=True)
        options = dict(agg=cfg.loss_agg, norm_length=float(cfg.max_new_tokens), clip_low=cfg.clip_low,
                       clip_high=cfg.clip_high, dual_clip=cfg.dual_clip)
        loss_rl, _ = policy_loss(lp.log_probs, mb.old_log_probs, mb.advantages, mb.loss_mask, **options)
        heads = mtp_head_losses(cfg.regime, mtp_log_prob=lp.mtp_log_probs, mtp_mask=mb.head_mask,
                                log_prob=lp.log_probs, old_log_prob=mb.old_log_probs, advantages=mb.advantages,
                                probe=True, **options)
        shared = model.shared_parameters()
        for k, loss_k in enumerate(heads):
            terms = gradient_alignment(shared, loss_rl, loss_k)
            out.update({f"exact/{k}/{_NAMES[name]}": value for name, value in terms.items()})
            _, proxy = occ_coefficient(lp.mtp_log_probs[k].detach(), lp.log_probs.detach(), mb.old_log_probs,
                                       mb.head_mask[k], eps=cfg.occ_eps, estimator=cfg.occ_estimator)
            out[f"exact/{k}/proxy_c_hat"] = proxy["c_hat"]
    with torch.no_grad():
        return dist.mean_values(out)
