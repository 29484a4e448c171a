"""The training update of one rollout batch: epochs × mini-batches of AdamW steps (no rollout here).

Shared by the trainer (`mtprl.train.loop`) and `benchmarks/bench_update.py`. Per micro-batch:
    L = L_RL + L_MTP(regime) [+ β · KL]       (all maths from `mtprl.losses`)
then backward. Every loss is divided by counts over the *whole* mini-batch (all its micro-batches
on all workers), so the micro-batch gradients add up to the mini-batch gradient; they are summed
over workers (see `mtprl.train.distributed`), clipped, and AdamW steps.

Departures from the paper's recipe / verl:
- Gradient clipping applies to the shared parameters and the MTP-only parameters separately (each
  to `max_grad_norm`), so the MTP-only gradient can never shrink the shared step: under `frozen`
  and `detach-mtp-only` the shared parameters then take exactly the step of a run without MTP term.
- OCC's ĉ (and occ-exact's slope) is computed per micro-batch, from the tokens of the forward pass
  it scales (as verl computes each micro-batch's loss); with micro_batch_size >= the mini-batch it
  is the mini-batch's ĉ. λ is identical for 1 or N workers when the micro-batches are the same rows.
  Under `sort_micro_batches` (off by default) only the forward passes run on rows sorted by length;
  ĉ is still that of the unsorted micro-batch (see `accumulate_gradients`).
- Dropout is off (the model stays in eval mode), so old and new log-probs are comparable.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from mtprl.losses import exact_slopes, get_regime, kl_loss, mtp_head_losses, mtp_loss, policy_loss
from mtprl.losses.offpolicy import tis_weights
from mtprl.train.batch import (
    Counts, TrainBatch, gather_log_probs, layout_log_probs, micro_batches, minibatch_rows, response_log_probs,
    sort_lengths,
)
from mtprl.train.distributed import Dist
from mtprl.train.exact import exact_terms, heldout_terms
from mtprl.train.fsdp import clip_grad_norm_ as fsdp_clip_grad_norm_
from mtprl.train.fsdp import is_sharded


def trainable(model) -> tuple[list[Tensor], list[Tensor]]:
    """(shared, MTP-only) parameters that the optimiser updates."""
    return ([p for p in model.shared_parameters() if p.requires_grad],
            [p for p in model.mtp_parameters() if p.requires_grad])


def build_optimizer(model, cfg):
    """AdamW (no weight decay on 1-D parameters) and a linear warm-up then constant LR schedule."""
    shared, mtp = trainable(model)
    params = shared + mtp
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: min(1.0, (n + 1) / (warmup + 1)))
    return optimizer, scheduler


def prepare_log_probs(model, ref_model, batch: TrainBatch, cfg, step: int, dist: Dist) -> None:
    """Set the batch's old (and reference) log-probs, computed in epoch 0's micro-batch layout
    (or, with `reuse_rollout_log_probs`, the sampler's own, which differ by float rounding)."""
    lengths = sort_lengths(batch, cfg)
    layout = [mb for rows in minibatch_rows(batch.size, cfg.mini_batches, cfg.seed, step, 0)
              for mb in micro_batches(rows, dist, cfg.micro_batch_size, lengths)]
    if getattr(cfg, "reuse_rollout_log_probs", False):
        if batch.rollout_log_probs is None:
            raise ValueError("reuse_rollout_log_probs needs the batch's rollout_log_probs (set by collect_batch)")
        batch.old_log_probs = torch.where(batch.loss_mask, batch.rollout_log_probs, 0.0)
    else:
        batch.old_log_probs = layout_log_probs(model, batch, layout, cfg.temperature, dist, lengths is not None)
    if ref_model is not None:
        batch.ref_log_probs = layout_log_probs(ref_model, batch, layout, cfg.temperature, dist, lengths is not None)


@torch.no_grad()
def _diagnostics(lp, mb: TrainBatch) -> dict[str, float]:
    """Entropy and, per head, the teacher-forced top-1 agreement and NLL (the same keys under every regime)."""
    def mean(values: Tensor, mask: Tensor) -> float:
        return float(torch.where(mask, values.float(), 0.0).sum() / mask.sum().clamp(min=1))

    out = {"entropy": mean(lp.entropy, mb.loss_mask)}
    for k in range(mb.head_mask.shape[0]):
        mask = mb.head_mask[k]
        out[f"mtp/{k}/top1"] = mean(lp.mtp_top1[k], mask)
        out[f"mtp/{k}/nll"] = mean(-lp.mtp_log_probs[k], mask)
    return out


def _loss_options(cfg, counts: Counts) -> dict:
    return dict(agg=cfg.loss_agg, norm_length=float(cfg.max_new_tokens), clip_low=cfg.clip_low,
                clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, global_tokens=counts.head_tokens,
                global_seqs=counts.head_seqs)


def _scores_the_batch_tokens(lp, mb: TrainBatch) -> bool:
    """Whether log-probs `lp` cover exactly the micro-batch's loss tokens (main head) and head tokens (MTP)."""
    return torch.equal(lp.mask, mb.loss_mask) and torch.equal(lp.mtp_mask, mb.head_mask)


def microbatch_forward(model, mb: TrainBatch, cfg, left_align: bool = False):
    """The training forward of a micro-batch: `response_log_probs` with entropy and MTP heads (with graph)."""
    lp = response_log_probs(model, mb, cfg.temperature, with_entropy=True, mtp=True, left_align=left_align)
    if not _scores_the_batch_tokens(lp, mb):
        raise RuntimeError("the model scores other tokens than the batch layout expects; "
                           "mtprl.train.batch.head_masks must follow MTPCausalLM.token_log_probs")
    return lp


def microbatch_loss(model, mb: TrainBatch, cfg, counts: Counts, lp=None) -> tuple[Tensor, dict[str, float]]:
    """The micro-batch's share of the mini-batch loss (0-dim, with graph) and its metrics.

    `lp`: the micro-batch's `microbatch_forward` if already computed elsewhere (under
    `sort_micro_batches`, gathered from the forwards of the sorted micro-batches)."""
    if lp is None:
        lp = microbatch_forward(model, mb, cfg)
    elif not _scores_the_batch_tokens(lp, mb):
        raise RuntimeError("the given log-probs cover other tokens than the micro-batch (gather_log_probs' rows "
                           "or width do not match the micro-batch)")
    advantages, tis = mb.advantages, {}
    if getattr(cfg, "tis_cap", 0) > 0:  # TIS: per-token weights as advantage factors (mtprl.losses.offpolicy)
        weights, tis = tis_weights(mb.old_log_probs, mb.rollout_log_probs, mb.loss_mask, cfg.tis_cap)
        advantages = mb.advantages[:, None] * weights  # [B, R]
    loss_rl, pg = policy_loss(lp.log_probs, mb.old_log_probs, advantages, mb.loss_mask, cfg.clip_low,
                              cfg.clip_high, cfg.dual_clip, cfg.loss_agg, global_tokens=counts.tokens,
                              global_seqs=counts.seqs, norm_length=float(cfg.max_new_tokens))
    regime = get_regime(cfg.regime)
    inputs = dict(mtp_log_prob=lp.mtp_log_probs, mtp_mask=mb.head_mask, log_prob=lp.log_probs,
                  old_log_prob=mb.old_log_probs, advantages=mb.advantages, **_loss_options(cfg, counts))
    slopes = None
    if regime.needs_exact_slopes:  # two extra backward passes per head, on the shared parameters
        slopes = exact_slopes(model.shared_parameters(), loss_rl, mtp_head_losses(regime, **inputs), cfg.occ_eps)
    loss_mtp, mtp = mtp_loss(regime, coef=cfg.mtp_coef, occ_estimator=cfg.occ_estimator, occ_eps=cfg.occ_eps,
                             occ_clip=tuple(cfg.occ_clip) or None, exact_slope=slopes, **inputs)
    loss = loss_rl + loss_mtp
    metrics = {**pg, **mtp, **tis, **_diagnostics(lp, mb)}
    if cfg.kl_coef > 0:
        kl, kl_metrics = kl_loss(lp.log_probs, mb.ref_log_probs, mb.loss_mask, cfg.kl_estimator, cfg.loss_agg,
                                 global_tokens=counts.tokens, global_seqs=counts.seqs,
                                 norm_length=float(cfg.max_new_tokens))
        loss = loss + cfg.kl_coef * kl
        metrics.update(kl_metrics)
    return loss, metrics


class MetricSums:
    """Micro-batch metrics → mini-batch values: losses (already shares of the whole) add up, the rest
    are averaged weighted by each micro-batch's tokens; both summed over workers."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.weight = 0.0

    def add(self, metrics: dict[str, float], weight: float) -> None:
        for key, value in metrics.items():
            self.sums[key] += value if key.endswith("/loss") else value * weight
        self.weight += weight

    def result(self, dist: Dist) -> dict[str, float]:
        totals = {k: v * dist.world for k, v in dist.mean_values({**self.sums, "_weight": self.weight}).items()}
        weight = max(totals.pop("_weight"), 1e-12)
        return {k: v if k.endswith("/loss") else v / weight for k, v in totals.items()}


def _step(model, optimizer, scheduler, cfg, dist: Dist) -> dict[str, float]:
    """Sum gradients over workers, clip shared and MTP-only parameters separately, AdamW step.

    Sharded (FSDP2): the backward passes have already summed the gradients into each rank's shard,
    and the norms are reduced over the shards (`fsdp.clip_grad_norm_`)."""
    shared, mtp = trainable(model)
    for p in shared + mtp:
        if p.grad is None:  # unreached in this mini-batch: a zero gradient, the same on every worker
            p.grad = torch.zeros_like(p)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    if is_sharded(model):
        clip = fsdp_clip_grad_norm_
    else:
        dist.sum_([p.grad for p in shared + mtp])
        clip = torch.nn.utils.clip_grad_norm_
    out = {"grad_norm": float(clip(shared, max_norm)), "lr": scheduler.get_last_lr()[0],
           "mtp/grad_norm": float(clip(mtp, max_norm)) if mtp else 0.0}  # 0: none trains
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def accumulate_gradients(model, batch: TrainBatch, rows: Tensor, cfg, dist: Dist) -> dict[str, float]:
    """Forward and backward of this worker's micro-batches of mini-batch `rows` (global indices) into
    `.grad`, not yet summed over workers; returns the mini-batch's metrics (over all workers).

    Under `sort_micro_batches` the forward passes run on the rows sorted by length, left-aligned
    (less padding), all of the mini-batch's before any loss; each loss is then formed in the unsorted micro-batches
    from the gathered rows, so every per-micro-batch quantity (OCC's ĉ, occ-exact's slope, metrics)
    sees the tokens it sees without the option, and one backward runs through all of them."""
    counts = Counts.of(batch, rows)
    sums = MetricSums()
    layout = micro_batches(rows, dist, cfg.micro_batch_size)
    lengths = sort_lengths(batch, cfg)
    if lengths is None:
        for mb_rows in layout:
            mb = batch.select(mb_rows)
            loss, metrics = microbatch_loss(model, mb, cfg, counts)
            loss.backward()
            sums.add(metrics, float(mb.loss_mask.sum()))
        return sums.result(dist)
    forwards = [(mb_rows, microbatch_forward(model, batch.select(mb_rows), cfg, left_align=True))
                for mb_rows in micro_batches(rows, dist, cfg.micro_batch_size, lengths)]
    total = None
    for mb_rows in layout:
        mb = batch.select(mb_rows)
        lp = gather_log_probs(forwards, mb_rows, mb.response_mask.shape[1])
        loss, metrics = microbatch_loss(model, mb, cfg, counts, lp=lp)
        total = loss if total is None else total + loss
        sums.add(metrics, float(mb.loss_mask.sum()))
    if total is not None:
        total.backward()
    return sums.result(dist)


def minibatch_update(model, optimizer, scheduler, batch: TrainBatch, rows: Tensor, cfg, dist: Dist) -> dict[str, float]:
    """One optimiser step on mini-batch `rows`: gradients of this worker's share, summed over workers, step."""
    metrics = accumulate_gradients(model, batch, rows, cfg, dist)
    return {**metrics, **_step(model, optimizer, scheduler, cfg, dist)}


def update_plan(n: int, cfg, step: int) -> list[tuple[Tensor, bool]]:
    """(rows, is the last update) of every optimiser step of rollout batch `step`, in order: epochs × mini-batches."""
    plan = [rows for epoch in range(cfg.epochs) for rows in minibatch_rows(n, cfg.mini_batches, cfg.seed, step, epoch)]
    return [(rows, i == len(plan) - 1) for i, rows in enumerate(plan)]


def train_on_batch(model, optimizer, scheduler, batch: TrainBatch, cfg, step: int, dist: Dist,
                   exact: bool = False) -> dict[str, float]:
    """All updates of one rollout batch (old log-probs set); metrics averaged over its mini-batches.

    `mtp/{k}/lambda_first` is λ on the first mini-batch after the rollout. With `exact`, the exact
    gradient terms are measured just before the last mini-batch's update: same-batch on its first
    micro-batch (`exact/{k}/...`) and held-out on the whole batch split by prompt group (`heldout/...`).
    """
    per_minibatch, exact_metrics = [], {}
    for rows, last in update_plan(batch.size, cfg, step):
        if exact and last:
            exact_metrics = {**exact_terms(model, batch, rows, cfg, dist),
                             **heldout_terms(model, optimizer, batch, cfg, step, dist)}
        per_minibatch.append(minibatch_update(model, optimizer, scheduler, batch, rows, cfg, dist))
    keys = per_minibatch[0].keys()
    out = {k: sum(m[k] for m in per_minibatch) / len(per_minibatch) for k in keys}
    out["lr"] = per_minibatch[-1]["lr"]
    for k in range(batch.head_mask.shape[0]):
        out[f"mtp/{k}/lambda_first"] = per_minibatch[0][f"mtp/{k}/lambda"]
    return {**out, **exact_metrics}
