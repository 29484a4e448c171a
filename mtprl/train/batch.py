"""The rollout batch as the update sees it, its mini-/micro-batch layout, and its per-token log-probs.

A `TrainBatch` holds N sequences `prompt ++ response` ([N, P + R], prompts left-padded, responses
right-padded), the advantages, and the masks of the tokens each head is trained on. The masks
follow `MTPCausalLM.token_log_probs`' rule (DESIGN §1: head k scores target t when x_t and
x_{t-k-2} are real tokens; the main head when x_t and x_{t-1} are), restricted to response tokens,
so the counts over a whole mini-batch, which normalise the loss of each micro-batch and worker,
are known before any forward pass.

Layout. Epoch e of step s shuffles the N rows with a seed of (seed, s, e) and cuts them into
`mini_batches` equal mini-batches; worker r takes its contiguous share of each mini-batch and cuts
it into micro-batches of `micro_batch_size` rows. Old log-probs are computed in exactly the
micro-batches of epoch 0, so on the first mini-batch (θ = θ_old) the training forward reproduces
them bit for bit: ratio 1, δ = 0, and OCC's λ = 0 exactly. The option `sort_micro_batches` runs
the forward passes (old log-probs and training) on each worker's rows of a mini-batch listed by
length, every row moved to column 0 (same rows, no left padding, little right padding); the training losses are still formed in the unsorted
micro-batches from the gathered rows (`gather_log_probs`), so losses, λ and gradients equal those
without the option up to float rounding.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
from torch import Tensor

from mtprl.losses import valid_counts
from mtprl.model import LogProbs
from mtprl.train.distributed import Dist


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (python's hash() is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def head_masks(attention_mask: Tensor, response_mask: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """(main mask [N, R], per-head masks [K, N, R]) of the response tokens each head scores.

    attention_mask [N, P + R] bool; response_mask [N, R] bool.
    """
    L, R = attention_mask.shape[1], response_mask.shape[1]

    def scored(back: int) -> Tensor:  # x_t and x_{t-back} both real, response columns only
        prev = torch.zeros_like(attention_mask)
        if back < L:
            prev[:, back:] = attention_mask[:, :-back]
        return (attention_mask & prev)[:, L - R:] & response_mask

    heads = [scored(k + 2) for k in range(num_heads)]
    return scored(1), torch.stack(heads) if heads else response_mask.new_zeros(0, *response_mask.shape)


@dataclasses.dataclass
class TrainBatch:
    """One rollout batch ready for updates; all tensors share the row dimension N."""

    input_ids: Tensor  # [N, P + R] int64, prompt (left-padded) then response (right-padded)
    attention_mask: Tensor  # [N, P + R] bool
    response_mask: Tensor  # [N, R] bool, real response tokens (EOS included)
    advantages: Tensor  # [N] float32
    loss_mask: Tensor  # [N, R] bool, response tokens the main head scores
    head_mask: Tensor  # [K, N, R] bool, response tokens MTP head k scores
    old_log_probs: Tensor | None = None  # [N, R] float32, main head at θ_old
    ref_log_probs: Tensor | None = None  # [N, R] float32, frozen reference (KL loss only)
    rollout_log_probs: Tensor | None = None  # [N, R] float32, the sampler's log-probs (0 outside the response)

    @classmethod
    def build(cls, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, advantages: Tensor,
              num_heads: int) -> "TrainBatch":
        loss_mask, head_mask = head_masks(attention_mask, response_mask, num_heads)
        return cls(input_ids, attention_mask, response_mask, advantages.float(), loss_mask, head_mask)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def select(self, rows: Tensor) -> "TrainBatch":
        """Rows `rows` with the columns no selected row uses cut off (leading padding, trailing padding)."""
        attn = self.attention_mask[rows]
        resp = self.response_mask[rows]
        first = int(attn.any(0).long().argmax()) if attn.any() else 0
        first = min(first, self.prompt_len - 1)
        width = int(resp.sum(1).max()) if resp.numel() else 0
        cols = slice(first, self.prompt_len + width)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows][:, :width]

        return TrainBatch(
            input_ids=self.input_ids[rows][:, cols], attention_mask=attn[:, cols], response_mask=resp[:, :width],
            advantages=self.advantages[rows], loss_mask=pick(self.loss_mask),
            head_mask=self.head_mask[:, rows][:, :, :width], old_log_probs=pick(self.old_log_probs),
            ref_log_probs=pick(self.ref_log_probs), rollout_log_probs=pick(self.rollout_log_probs),
        )


@dataclasses.dataclass(frozen=True)
class Counts:
    """Valid tokens / sequences of a whole mini-batch, main head and per MTP head (the loss normalisers)."""

    tokens: Tensor  # 0-dim
    seqs: Tensor  # 0-dim
    head_tokens: Tensor  # [K]
    head_seqs: Tensor  # [K]

    @classmethod
    def of(cls, batch: TrainBatch, rows: Tensor) -> "Counts":
        tokens, seqs = valid_counts(batch.loss_mask[rows])
        head_tokens, head_seqs = valid_counts(batch.head_mask[:, rows])
        return cls(tokens.clamp(min=1), seqs.clamp(min=1), head_tokens.clamp(min=1), head_seqs.clamp(min=1))


def minibatch_rows(n: int, mini_batches: int, seed: int, step: int, epoch: int) -> list[Tensor]:
    """Global row indices of each mini-batch of epoch `epoch` of step `step` (a seeded shuffle)."""
    generator = torch.Generator().manual_seed(derive_seed("minibatches", seed, step, epoch))
    return list(torch.randperm(n, generator=generator).chunk(mini_batches))


def sort_lengths(batch: "TrainBatch", cfg) -> Tensor | None:
    """The row lengths [N] (prompt + response tokens) that `micro_batches` orders rows by under
    `cfg.sort_micro_batches` (whose forwards run left-aligned), else None."""
    return batch.attention_mask.sum(1) if getattr(cfg, "sort_micro_batches", False) else None


def micro_batches(rows: Tensor, dist: Dist, micro_batch_size: int, lengths: Tensor | None = None) -> list[Tensor]:
    """This worker's share of a mini-batch's rows, cut into micro-batches.

    With `lengths` [N] (see `sort_lengths`), this worker's rows are first listed by length
    (stable), so that each micro-batch holds rows of similar length and carries less padding; the
    worker's rows are the same either way.
    """
    mine = rows[dist.share(len(rows))]
    if lengths is not None:
        mine = mine[torch.sort(lengths[mine], stable=True).indices]
    return list(mine.split(micro_batch_size))


def gather_log_probs(parts: list[tuple[Tensor, LogProbs]], rows: Tensor, width: int) -> LogProbs:
    """The `response_log_probs` of `rows` ([B] global indices), `width` response columns, taken from
    those of other micro-batches: `parts` = [(their rows, their response_log_probs)], which must hold
    every row of `rows`. Rows are copied with their graph; columns past a part's own width are zeros
    (False), as `response_log_probs` gives past a row's end, so the result equals the forward of
    `batch.select(rows)` up to float rounding."""
    fields = ("log_probs", "mask", "mtp_log_probs", "mtp_mask", "mtp_top1", "entropy")
    widest = max([width] + [lp.log_probs.shape[-1] for _, lp in parts])
    where = {int(r): i for i, r in enumerate(torch.cat([r for r, _ in parts]).tolist())}
    missing = [int(r) for r in rows.tolist() if int(r) not in where]
    if missing:
        raise ValueError(f"gather_log_probs: rows {missing[:5]} are in none of the parts' micro-batches")
    index = torch.tensor([where[int(r)] for r in rows.tolist()], device=parts[0][1].log_probs.device)

    def take(name: str):
        values = [getattr(lp, name) for _, lp in parts]
        if values[0] is None:
            return None
        dim = values[0].dim() - 2  # the row dimension: [B, R] or [K, B, R]
        padded = [torch.nn.functional.pad(v, (0, widest - v.shape[-1])) for v in values]
        return torch.cat(padded, dim=dim).index_select(dim, index)[..., :width]

    return dataclasses.replace(parts[0][1], **{name: take(name) for name in fields})


def response_log_probs(model, batch: TrainBatch, temperature: float, *, with_entropy: bool = False, mtp: bool = True,
                       left_align: bool = False):
    """`token_log_probs` of the batch with every output cut to the response columns ([.., R]).

    `left_align`: run the forward on every row's tokens moved to column 0 (no left padding; the
    width is the longest row's own length, not longest prompt + longest response) and place the
    outputs back in the batch's columns; the same numbers up to float rounding (positions come from
    the mask, padding is masked), zeros and False outside each head's valid tokens as without it."""
    if left_align:
        return _left_aligned_log_probs(model, batch, temperature, with_entropy=with_entropy, mtp=mtp)
    out = model.token_log_probs(batch.input_ids, batch.attention_mask, temperature=temperature,
                                with_entropy=with_entropy, mtp=mtp)
    P = batch.prompt_len
    return dataclasses.replace(
        out, log_probs=out.log_probs[:, P:], mask=out.mask[:, P:] & batch.response_mask,
        mtp_log_probs=out.mtp_log_probs[:, :, P:], mtp_mask=out.mtp_mask[:, :, P:] & batch.response_mask,
        mtp_top1=out.mtp_top1[:, :, P:], entropy=None if out.entropy is None else out.entropy[:, P:],
    )


def _left_aligned_log_probs(model, batch: TrainBatch, temperature: float, *, with_entropy: bool, mtp: bool):
    """`response_log_probs` computed on the rows moved left by their leading padding (see there)."""
    ids, attn = batch.input_ids, batch.attention_mask  # [B, L], prompt left-padded, response right-padded
    L, P, R = ids.shape[1], batch.prompt_len, batch.response_mask.shape[1]
    lead = (~attn).long().cumprod(1).sum(1)  # [B] leading pad columns
    total = attn.sum(1)  # [B] real tokens (prompt and response are contiguous)
    W = max(int(total.max()), 1) if total.numel() else 1
    cols = torch.arange(W, device=ids.device)
    src = (cols[None] + lead[:, None]).clamp(max=L - 1)  # [B, W]
    packed_mask = attn.gather(1, src) & (cols[None] < total[:, None])
    out = model.token_log_probs(torch.where(packed_mask, ids.gather(1, src), ids.new_tensor(0).expand_as(src)),
                                packed_mask, temperature=temperature, with_entropy=with_entropy, mtp=mtp)
    back = (torch.arange(R, device=ids.device)[None] + (P - lead)[:, None]).clamp(max=W - 1)  # [B, R]
    K = out.mtp_log_probs.shape[0]
    back_k = back[None].expand(K, *back.shape)  # [K, B, R]
    mask = out.mask.gather(1, back) & batch.response_mask
    mtp_mask = out.mtp_mask.gather(2, back_k) & batch.response_mask
    entropy = None if out.entropy is None else torch.where(mask, out.entropy.gather(1, back), 0.0)
    return dataclasses.replace(
        out, log_probs=torch.where(mask, out.log_probs.gather(1, back), 0.0), mask=mask,
        mtp_log_probs=torch.where(mtp_mask, out.mtp_log_probs.gather(2, back_k), 0.0), mtp_mask=mtp_mask,
        mtp_top1=out.mtp_top1.gather(2, back_k) & mtp_mask, entropy=entropy,
    )


@torch.no_grad()
def layout_log_probs(model, batch: TrainBatch, layout: list[Tensor], temperature: float, dist: Dist,
                     left_align: bool = False) -> Tensor:
    """Main-head log-probs [N, R] of every row, computed in the micro-batches `layout` (this worker's
    micro-batches of epoch 0; with `left_align`, as `response_log_probs` says) and gathered from all workers."""
    R = batch.response_mask.shape[1]
    rows = torch.cat(layout) if layout else torch.zeros(0, dtype=torch.long)
    values = torch.zeros(len(rows), R, dtype=torch.float32, device=batch.input_ids.device)
    offset = 0
    for mb_rows in layout:
        mb = batch.select(mb_rows)
        lp = response_log_probs(model, mb, temperature, mtp=False, left_align=left_align).log_probs
        values[offset: offset + len(mb_rows), : lp.shape[1]] = lp.float()
        offset += len(mb_rows)
    all_rows = dist.gather_rows(rows.to(values.device))
    all_values = dist.gather_rows(values)
    out = torch.zeros(batch.size, R, dtype=torch.float32, device=values.device)
    out[all_rows] = all_values
    return out
