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

Sharded (`parallel: fsdp`): `torch.autograd.grad` cannot reach FSDP2's sharded parameters, so the
probe takes two backward passes into `.grad` instead (summed over ranks by FSDP, read as shards,
then cleared: the update after it starts from zero gradients as before) and reduces the inner
products and norms over the shards. Its batch is the first max(micro_batch_size, workers) rows of
the mini-batch shared over the workers, each loss normalised over all of those rows: the gradient
of one process's first micro-batch, so the values equal a 1-process run's (a test checks).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import Tensor

from mtprl.losses import gradient_alignment, mtp_head_losses, occ_coefficient, policy_loss
from mtprl.train.batch import TrainBatch, micro_batches, response_log_probs
from mtprl.train.distributed import Dist
from mtprl.train.fsdp import global_sum, is_sharded, local

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
    if is_sharded(model):
        return _sharded_exact_terms(model, batch, rows, cfg, dist)
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


def _shard_grads(loss: Tensor, every: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """This rank's shards of ∇ loss (summed over ranks by FSDP) on `params`; every `.grad` of `every` (all
    the model's sharded parameters: the backward also reaches the MTP-only ones) is as before afterwards.

    Both lists must hold the sharded parameters, taken outside any forward: between a forward and its
    backward the root's parameters are the unsharded tensors, whose `.grad` FSDP does not keep."""
    saved = [(p, p.grad) for p in every]
    for p, _ in saved:
        p.grad = None
    loss.backward()
    out = [local(p.grad).detach().double().clone() if p.grad is not None
           else torch.zeros_like(local(p), dtype=torch.float64) for p in params]
    for p, grad in saved:
        p.grad = grad
    return out


def _sharded_exact_terms(model, batch: TrainBatch, rows: Tensor, cfg, dist: Dist) -> dict[str, float]:
    """`exact_terms` of an FSDP2-sharded model (module docstring): global probe batch, gradients by backward.

    One forward pass per backward (1 + K of each): FSDP2 runs its reduce-scatter from hooks of the
    forward, so a second backward through a retained graph would leave its gradients unreduced
    until the next backward (that of the update).
    """
    from mtprl.losses import valid_counts

    probe = rows[: min(len(rows), max(cfg.micro_batch_size, dist.world))]
    tokens, seqs = valid_counts(batch.loss_mask[probe])
    head_tokens, head_seqs = valid_counts(batch.head_mask[:, probe])
    mb = batch.select(probe[dist.share(len(probe))])
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    every = list(model.parameters())
    options = dict(agg=cfg.loss_agg, norm_length=float(cfg.max_new_tokens), clip_low=cfg.clip_low,
                   clip_high=cfg.clip_high, dual_clip=cfg.dual_clip)

    def losses():  # [L_RL, L_0, ..., L_{K-1}] over the probe batch, and the log-probs
        lp = response_log_probs(model, mb, cfg.temperature, mtp=True)
        loss_rl, _ = policy_loss(lp.log_probs, mb.old_log_probs, mb.advantages, mb.loss_mask, **options,
                                 global_tokens=tokens.clamp(min=1), global_seqs=seqs.clamp(min=1))
        heads = mtp_head_losses(cfg.regime, mtp_log_prob=lp.mtp_log_probs, mtp_mask=mb.head_mask,
                                log_prob=lp.log_probs, old_log_prob=mb.old_log_probs, advantages=mb.advantages,
                                probe=True, global_tokens=head_tokens.clamp(min=1),
                                global_seqs=head_seqs.clamp(min=1), **options)
        return [loss_rl, *heads], lp

    out: dict[str, float] = {}
    with detach_off(model):
        grads, proxy = [], {}
        for i in range(1 + model.num_mtp):
            all_losses, lp = losses()
            loss = all_losses[i]
            del all_losses  # no graph of this forward but the one backward through
            grads.append(_shard_grads(loss, every, shared))
            if i == 0:
                proxy = {k: _global_proxy(lp, mb, k, cfg, dist) for k in range(model.num_mtp)}
            del loss, lp
        g_rl = grads[0]
        for k, g_k in enumerate(grads[1:]):
            sums = torch.stack([sum((a * b).sum() for a, b in zip(g_rl, g_k)), sum(a.square().sum() for a in g_rl),
                                sum(b.square().sum() for b in g_k)])
            dot, rl_sq, mtp_sq = global_sum(sums, True).tolist()
            norms = (rl_sq ** 0.5) * (mtp_sq ** 0.5)
            out.update({f"exact/{k}/dot": dot, f"exact/{k}/g_rl_sq": rl_sq, f"exact/{k}/g_mtp_sq": mtp_sq,
                        f"exact/{k}/cos": dot / norms if norms > 0 else 0.0,
                        f"exact/{k}/slope": dot / (mtp_sq + 1e-8)})
            out[f"exact/{k}/proxy_c_hat"] = proxy[k]
    return out


def _global_proxy(lp, mb: TrainBatch, k: int, cfg, dist: Dist) -> float:
    """OCC's ĉ of head k over every worker's rows of the probe batch (mean-ratio or ratio-of-sums)."""
    mask = mb.head_mask[k]
    delta = (lp.log_probs.detach() - mb.old_log_probs)[mask].double()
    mu = (lp.mtp_log_probs[k].detach() - mb.old_log_probs)[mask].double()
    if cfg.occ_estimator == "ratio-of-sums":
        sums = torch.stack([(delta * mu).sum(), mu.square().sum()])
        num, den = global_sum(sums, True).tolist()
        return num / (den + cfg.occ_eps)
    sums = torch.stack([(delta * mu / (mu.square() + cfg.occ_eps)).sum(), torch.tensor(float(mask.sum()),
                                                                                    dtype=torch.float64)])
    num, count = global_sum(sums, True).tolist()
    return num / max(count, 1.0)
