"""The exact gradient decomposition on the shared parameters, measured for every regime (DESIGN §1).

Two measurements, both every `exact_every` steps just before the last mini-batch's update:
- `exact/{k}/...` (same-batch, `exact_terms`): g_RL and g_MTP from the *same* micro-batch, so
  ⟨ĝ_RL, ĝ_MTP⟩ carries the bias tr Cov(ĝ_RL, ĝ_MTP). Kept under its own names for comparison.
- `heldout/{k}/...` (`heldout_terms`): the whole rollout batch split by prompt group into two halves
  with a seeded permutation of its own (no global random numbers); g_RL and g_MTP of each half, and the
  split-half Euclidean and AdamW-preconditioned terms of `mtprl.losses.heldout` (P from the
  optimiser's current exp_avg_sq, bias-corrected, its ε; H ≈ I in λ*), beside the OCC proxy ĉ of the
  same tokens under both estimators. Costs one forward and K + 1 gradient calls over the whole batch.

Same-batch terms: on one micro-batch (this worker's first of the given mini-batch, at the current parameters,
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

Sharded (`parallel: fsdp`): `torch.autograd.grad` cannot reach FSDP2's sharded parameters, so both
measurements take backward passes into `.grad` instead (summed over ranks by FSDP, read as shards, then
restored: the update after them starts from the gradients it had; `_shard_grads`), one forward per
backward, and reduce the inner products and norms over the shards. The same-batch probe's batch is the
first max(micro_batch_size, workers) rows of the mini-batch shared over the workers, each loss normalised
over all of those rows: the gradient of one process's first micro-batch. The held-out halves run through
each worker's micro-batches as unsharded, once per loss (g_RL, then each head's); a worker with fewer
micro-batches than another adds passes of zero weight, so every rank runs the same collectives. Both
equal a 1-process run's values (a test checks).

The OCC proxy figures (`proxy_c_hat`, `proxy_mean_ratio`, `proxy_ratio_of_sums`) all come from
`mtprl.losses.occ.proxy_sums` / `proxy_from_sums`, the statistics `occ_coefficient` itself uses, summed
over micro-batches and workers.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import Tensor

from mtprl.losses import gradient_alignment, mtp_head_losses, occ_coefficient, policy_loss
from mtprl.losses.heldout import adam_preconditioner, split_half_terms
from mtprl.losses.occ import proxy_from_sums, proxy_sums
from mtprl.train.batch import Counts, TrainBatch, derive_seed, micro_batches, response_log_probs
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


# ----- held-out terms ------------------------------------------------------------------------------


def split_groups(n_rows: int, group_size: int, seed: int, step: int) -> tuple[Tensor, Tensor] | None:
    """Rows of two disjoint halves of the prompt groups (rows are prompt-major groups of `group_size`),
    from a generator of its own seeded by (seed, step); None with fewer than two groups."""
    groups = n_rows // group_size
    if groups < 2:
        return None
    generator = torch.Generator().manual_seed(derive_seed("heldout", seed, step))
    order = torch.randperm(groups, generator=generator)
    half = [order[: groups // 2], order[groups // 2:]]
    return tuple(torch.cat([torch.arange(group_size) + g * group_size for g in sorted(h.tolist())]) for h in half)


def adam_preconditioners(optimizer, params: list[Tensor]) -> list[Tensor] | None:
    """P per parameter from the optimiser's current state (zeros for a parameter it does not update);
    None before the optimiser's first step (no second moment yet)."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p in params:
        if id(p) not in groups:
            out.append(torch.zeros_like(local(p), dtype=torch.float64))
            continue
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            return None
        group = groups[id(p)]  # sharded: this rank's shard of P, from its shard of the second moment
        out.append(adam_preconditioner(local(state["exp_avg_sq"]), float(local(state["step"])), group["betas"][1],
                                       group["eps"]))
    return out


def _grads(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    wanted = [p for p in params if p.requires_grad]
    found = iter(torch.autograd.grad(loss, wanted, retain_graph=True, allow_unused=True) if loss.requires_grad
                 and wanted else [None] * len(wanted))
    out = []
    for p in params:
        g = next(found) if p.requires_grad else None
        out.append(torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float())
    return out


def _add(total: list[Tensor] | None, new: list[Tensor]) -> list[Tensor]:
    return new if total is None else [a + b for a, b in zip(total, new)]


def half_gradients(model, batch: TrainBatch, rows: Tensor, cfg, dist: Dist) -> tuple[list[Tensor], list[list[Tensor]],
                                                                                     dict[str, float]]:
    """(g_RL, [g_k], proxy sums) of the rows `rows` on the shared parameters, summed over workers.

    Losses are normalised over the whole half (all its micro-batches, all workers), so g is the half's
    gradient; the probe losses are those of `exact_terms` (every detach switch off). Proxy sums per head:
    `{k}/ratio` Σ δμ/(μ²+ε), `{k}/n` valid tokens, `{k}/dm` Σ δμ, `{k}/mm` Σ μ².
    """
    counts = Counts.of(batch, rows)
    shared = list(model.shared_parameters())
    g_rl, g_heads, sums = None, None, {}
    options = dict(agg=cfg.loss_agg, norm_length=float(cfg.max_new_tokens), clip_low=cfg.clip_low,
                   clip_high=cfg.clip_high, dual_clip=cfg.dual_clip)
    K = batch.head_mask.shape[0]
    with detach_off(model):
        for mb_rows in micro_batches(rows, dist, cfg.micro_batch_size):
            mb = batch.select(mb_rows)
            lp = response_log_probs(model, mb, cfg.temperature, mtp=True)
            loss_rl, _ = policy_loss(lp.log_probs, mb.old_log_probs, mb.advantages, mb.loss_mask,
                                     global_tokens=counts.tokens, global_seqs=counts.seqs, **options)
            heads = mtp_head_losses(cfg.regime, mtp_log_prob=lp.mtp_log_probs, mtp_mask=mb.head_mask,
                                    log_prob=lp.log_probs, old_log_prob=mb.old_log_probs, advantages=mb.advantages,
                                    probe=True, global_tokens=counts.head_tokens, global_seqs=counts.head_seqs,
                                    **options)
            g_rl = _add(g_rl, _grads(loss_rl, shared))
            per_head = [_grads(h, shared) for h in heads]
            g_heads = per_head if g_heads is None else [_add(a, b) for a, b in zip(g_heads, per_head)]
            _add_proxy_sums(sums, lp, mb, cfg.occ_eps)
    if g_rl is None:  # this worker holds no row of the half: zero gradients, zero sums
        g_rl = [torch.zeros_like(p, dtype=torch.float32) for p in shared]
        g_heads = [[torch.zeros_like(p, dtype=torch.float32) for p in shared] for _ in range(K)]
    dist.sum_(g_rl + [g for head in g_heads for g in head])
    return g_rl, g_heads, _total_sums(sums, K, dist)


_SUMS = ("ratio", "n", "dm", "mm")


@torch.no_grad()
def _add_proxy_sums(sums: dict[str, float], lp, mb: TrainBatch, eps: float) -> None:
    """Add a micro-batch's OCC proxy sums per head k (`proxy_sums`: Σ δμ/(μ²+ε), valid tokens, Σ δμ, Σ μ²)."""
    for k in range(mb.head_mask.shape[0]):
        values = proxy_sums(lp.mtp_log_probs[k], lp.log_probs, mb.old_log_probs, mb.head_mask[k], eps).tolist()
        for name, value in zip(_SUMS, values):
            sums[f"{k}/{name}"] = sums.get(f"{k}/{name}", 0.0) + value


def _total_sums(sums: dict[str, float], K: int, dist: Dist) -> dict[str, float]:
    sums = {f"{k}/{name}": sums.get(f"{k}/{name}", 0.0) for k in range(K) for name in _SUMS}
    return {key: value * dist.world for key, value in dist.mean_values(sums).items()}


def proxy_estimates(sums: dict[str, float], k: int, eps: float) -> dict[str, float]:
    """OCC's ĉ of head k under both estimators from `_add_proxy_sums` totals."""
    totals = torch.tensor([sums[f"{k}/{name}"] for name in _SUMS], dtype=torch.float64)
    return {"proxy_mean_ratio": float(proxy_from_sums(totals, "mean-ratio", eps)),
            "proxy_ratio_of_sums": float(proxy_from_sums(totals, "ratio-of-sums", eps))}


@torch.no_grad()
def proxy_of_rows(model, batch: TrainBatch, rows: Tensor, cfg, dist: Dist) -> list[dict[str, float]]:
    """Per head, OCC's ĉ (both estimators) over the tokens of rows `rows` at the current parameters."""
    sums: dict[str, float] = {}
    for mb_rows in micro_batches(rows, dist, cfg.micro_batch_size):
        mb = batch.select(mb_rows)
        _add_proxy_sums(sums, response_log_probs(model, mb, cfg.temperature, mtp=True), mb, cfg.occ_eps)
    K = batch.head_mask.shape[0]
    totals = _total_sums(sums, K, dist)
    return [proxy_estimates(totals, k, cfg.occ_eps) for k in range(K)]


def _share(batch: TrainBatch, rows_a: Tensor, rows_b: Tensor, mask: Tensor, by_tokens: bool) -> float:
    """Half A's share of the loss normaliser of the whole batch (valid tokens of `mask`, or sequences)."""
    def count(rows):
        m = mask[rows]
        return float(m.sum()) if by_tokens else float(m.any(-1).sum())
    a, b = count(rows_a), count(rows_b)
    return a / (a + b) if a + b > 0 else 0.5


def heldout_terms(model, optimizer, batch: TrainBatch, cfg, step: int, dist: Dist,
                  keep: dict | None = None) -> dict[str, float]:
    """`heldout/{k}/...` on the whole rollout batch split by prompt group (module docstring); {} with one group.

    Keys per head: the `split_half_terms` keys (the preconditioned ones once the optimiser has a second
    moment), `proxy_mean_ratio` and `proxy_ratio_of_sums` (OCC's ĉ over all the batch's tokens of the
    head at the current parameters), and `heldout/lr` (η of λ*). A `keep` dict receives the whole batch's
    per-head MTP gradients (`mtp`: [K][params]) and the preconditioner (`precond`, None before the first step).
    """
    halves = split_groups(batch.size, cfg.group_size, cfg.seed, step)
    if halves is None:
        return {}
    rows_a, rows_b = (h.to(batch.input_ids.device) for h in halves)
    sharded = is_sharded(model)  # then every gradient below is this rank's shard, and inner products are reduced
    gradients = sharded_half_gradients if sharded else half_gradients
    rl_a, heads_a, sums_a = gradients(model, batch, rows_a, cfg, dist)
    rl_b, heads_b, sums_b = gradients(model, batch, rows_b, cfg, dist)
    reduce = (lambda t: global_sum(t, True)) if sharded else None
    shared = list(model.shared_parameters())
    precond = adam_preconditioners(optimizer, shared)
    lr = float(optimizer.param_groups[0]["lr"])
    by_tokens = cfg.loss_agg == "token-mean"
    w_rl = _share(batch, rows_a, rows_b, batch.loss_mask, by_tokens)
    out: dict[str, float] = {"heldout/lr": lr}
    for k, (m_a, m_b) in enumerate(zip(heads_a, heads_b)):
        w_mtp = _share(batch, rows_a, rows_b, batch.head_mask[k], by_tokens)
        terms = split_half_terms(rl_a, rl_b, m_a, m_b, (w_rl, w_mtp), precond=precond, lr=lr, eps=cfg.occ_eps,
                                 reduce=reduce)
        terms.update(proxy_estimates({key: sums_a[key] + sums_b[key] for key in sums_a}, k, cfg.occ_eps))
        out.update({f"heldout/{k}/{name}": value for name, value in terms.items()})
        if keep is not None:
            keep.setdefault("mtp", []).append([w_mtp * a + (1 - w_mtp) * b for a, b in zip(m_a, m_b)])
    if keep is not None:
        keep["precond"] = precond
    return out


# ----- a sharded model: same-batch terms and held-out half gradients --------------------------------


def _shard_grads(backward, every: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """This rank's shards (float64) of the gradient that `backward()` (one or more backward passes) accumulates,
    summed over ranks by FSDP, on `params`; every `.grad` of `every` (all the model's sharded parameters: the
    backward also reaches the MTP-only ones) is as before afterwards.

    Both lists must hold the sharded parameters, taken outside any forward: between a forward and its
    backward the root's parameters are the unsharded tensors, whose `.grad` FSDP does not keep."""
    saved = [(p, p.grad) for p in every]
    for p, _ in saved:
        p.grad = None
    backward()
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
            grads.append(_shard_grads(loss.backward, every, shared))
            if i == 0:
                proxy = {k: _global_proxy(lp, mb, k, cfg) for k in range(model.num_mtp)}
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


def _global_proxy(lp, mb: TrainBatch, k: int, cfg) -> float:
    """OCC's ĉ of head k over every worker's rows of the probe batch (`proxy_sums` summed over ranks)."""
    sums = proxy_sums(lp.mtp_log_probs[k], lp.log_probs, mb.old_log_probs, mb.head_mask[k], cfg.occ_eps).double()
    return float(proxy_from_sums(global_sum(sums, True), cfg.occ_estimator, cfg.occ_eps))


def sharded_half_gradients(model, batch: TrainBatch, rows: Tensor, cfg, dist: Dist
                           ) -> tuple[list[Tensor], list[list[Tensor]], dict[str, float]]:
    """`half_gradients` of an FSDP2-sharded model: this rank's float64 shards of the shared parameters'
    (g_RL, [g_k]) of the rows `rows` (summed over ranks by FSDP), and the proxy sums over all workers.

    Per loss, one forward and backward per micro-batch of this worker (`micro_batches`, as unsharded), plus
    passes of weight 0 up to the most micro-batches any worker has, so every rank runs the same collectives.
    """
    counts = Counts.of(batch, rows)
    shared = list(model.shared_parameters())
    every = list(model.parameters())
    own = micro_batches(rows, dist, cfg.micro_batch_size)
    shares = [dist.share(len(rows), r) for r in range(dist.world)]
    passes = max(-(-(sh.stop - sh.start) // cfg.micro_batch_size) for sh in shares)  # the most micro-batches
    options = dict(agg=cfg.loss_agg, norm_length=float(cfg.max_new_tokens), clip_low=cfg.clip_low,
                   clip_high=cfg.clip_high, dual_clip=cfg.dual_clip)
    sums: dict[str, float] = {}

    def backward(i: int) -> None:  # ∇ of loss i (0: L_RL, 1 + k: head k's probe loss) over the whole half
        for j in range(passes):
            mb = batch.select(own[j] if j < len(own) else rows[:1])
            lp = response_log_probs(model, mb, cfg.temperature, mtp=True)
            if i == 0:
                loss, _ = policy_loss(lp.log_probs, mb.old_log_probs, mb.advantages, mb.loss_mask,
                                      global_tokens=counts.tokens, global_seqs=counts.seqs, **options)
            else:
                loss = mtp_head_losses(cfg.regime, mtp_log_prob=lp.mtp_log_probs, mtp_mask=mb.head_mask,
                                       log_prob=lp.log_probs, old_log_prob=mb.old_log_probs,
                                       advantages=mb.advantages, probe=True, global_tokens=counts.head_tokens,
                                       global_seqs=counts.head_seqs, **options)[i - 1]
            if j >= len(own):
                loss = loss * 0.0  # a pass of no weight: only the collectives
            elif i == 0:
                _add_proxy_sums(sums, lp, mb, cfg.occ_eps)
            loss.backward()

    K = batch.head_mask.shape[0]
    with detach_off(model):
        grads = [_shard_grads(lambda i=i: backward(i), every, shared) for i in range(1 + K)]
    return grads[0], grads[1:], _total_sums(sums, K, dist)
