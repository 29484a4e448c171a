"""The state of a batch being decoded, the buffer its responses are written to, and the prefill.

Cache layout. Every cache (the trunk's, and the MTP layer's when drafting) holds one slot per
token fed so far, for every row, in lockstep; `DecodeState.mask` [B, S] marks which slots hold
committed tokens. Left padding and rejected draft slots stay in the caches as masked-out holes
(speculative rows accept different numbers of drafts), and positions are counted over committed
tokens only, so a hole changes nothing downstream. Rows that have finished are dropped from the
batch (and from every cache) once a quarter of the batch has finished, and the caches are
repacked (each row's slots moved right, holes dropped) once half of every row's slots are holes.

Multi-token forwards (prefill, verification) with a padding mask make `transformers`' SDPA path
copy every key / value head once per query head group (`repeat_kv`); on CPU, `enable_gqa=True`
is 2-3x faster for that call, so `grouped_query_sdpa` switches it on around those forwards
(single-token decoding keeps transformers' own, faster, path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
from mtprl.model import MTPCausalLM
from mtprl.rollout.cache import SlotCache

COMPACT_FRACTION = 0.25  # drop finished rows once at least this fraction of the batch has finished
REPACK_HOLES = 0.5  # repack the caches once at least this fraction of their slots are holes in every row
REPACK_MIN_SLOTS = 64  # ... and they hold at least this many slots
_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers' sdpa_attention on every call


@contextlib.contextmanager
def grouped_query_sdpa(device: torch.device):
    """While open, transformers' SDPA attention passes enable_gqa=True on CPU (restored on exit)."""
    if device.type != "cpu" or os.environ.get(_FORCE_GQA) == "1":
        yield
        return
    previous = os.environ.get(_FORCE_GQA)
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_FORCE_GQA]
        else:
            os.environ[_FORCE_GQA] = previous


@dataclasses.dataclass
class DecodeState:
    """Rows still in the batch, aligned with their caches (row b of every tensor is cache row b)."""

    rows: torch.Tensor  # [B] output row (0..N-1) of each batch row
    mask: torch.Tensor  # [B, S] int64, 1 where a cache slot holds a committed token
    next_pos: torch.Tensor  # [B] position id of `last`
    last: torch.Tensor  # [B] last committed token, not yet fed to the trunk
    cache: SlotCache
    mtp_cache: SlotCache | None = None
    draft_hidden: torch.Tensor | None = None  # [B, d] MTP depth-1 state at source position next_pos - 1

    def select(self, keep: torch.Tensor) -> "DecodeState":
        """Keep batch rows `keep` [B'] (int64 indices) in every tensor and cache."""
        self.cache.batch_select_indices(keep)
        if self.mtp_cache is not None:
            self.mtp_cache.batch_select_indices(keep)
        return dataclasses.replace(
            self, rows=self.rows[keep], mask=self.mask[keep], next_pos=self.next_pos[keep], last=self.last[keep],
            draft_hidden=None if self.draft_hidden is None else self.draft_hidden[keep],
        )

    def repack(self) -> None:
        """Drop the slots no row needs: move each row's committed slots to the right end, in order."""
        valid = self.mask.bool()  # [B, S]
        width = int(valid.sum(1).max())
        # A stable sort on the 0/1 flags puts each row's holes first and its slots after, in order.
        order = torch.sort(valid.to(torch.uint8), dim=1, stable=True).indices[:, -width:]  # [B, W]
        self.cache.select_slots(order)
        if self.mtp_cache is not None:
            self.mtp_cache.select_slots(order)
        self.mask = self.mask.gather(1, order)

    def extend_mask(self, new_slots: torch.Tensor) -> None:
        """Append the validity of slots just fed to the caches: new_slots [B, s] bool/int."""
        self.mask = torch.cat([self.mask, new_slots.to(self.mask.dtype)], dim=1)


class ResponseBuffer:
    """Responses of all N rows: token ids, log-probs, lengths and finish reasons."""

    def __init__(self, num_rows: int, max_new_tokens: int, stop_ids: list[int], pad_id: int, device):
        self.max_new_tokens = max_new_tokens
        self.ids = torch.full((num_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.log_probs = torch.zeros(num_rows, max_new_tokens, dtype=torch.float32, device=device)
        self.lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
        self.finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
        self.stopped = torch.zeros(num_rows, dtype=torch.bool, device=device)
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    def alive(self, rows: torch.Tensor) -> torch.Tensor:
        """[B] bool: which of these output rows are still generating."""
        return ~self.finished[rows]

    def commit(self, rows: torch.Tensor, tokens: torch.Tensor, log_probs: torch.Tensor,
               count: torch.Tensor | None = None) -> None:
        """Append the first `count` of tokens [B, C] (log_probs [B, C]) to output rows `rows` [B].

        Finished rows take nothing; a row stops after a stop token (kept) or at max_new_tokens.
        count [B] defaults to C for every row.
        """
        if tokens.shape[1] == 1 and count is None:
            return self._commit_one(rows, tokens[:, 0], log_probs[:, 0])
        B, C = tokens.shape
        j = torch.arange(C, device=tokens.device)  # [C]
        start = self.lengths[rows]  # [B]
        take = (j < self.max_new_tokens - start[:, None]) & self.alive(rows)[:, None]  # [B, C]
        if count is not None:
            take &= j < count[:, None]
        is_stop = torch.isin(tokens, self.stop_ids) & take
        stop_at = torch.where(is_stop.any(1), is_stop.long().argmax(1), C)  # [B] index of the first stop
        take &= j <= stop_at[:, None]
        r, c = take.nonzero(as_tuple=True)
        self.ids[rows[r], start[r] + c] = tokens[r, c]
        self.log_probs[rows[r], start[r] + c] = log_probs[r, c].float()
        self._advance(rows, start + take.sum(1), stop_at < C)

    def _commit_one(self, rows: torch.Tensor, token: torch.Tensor, log_prob: torch.Tensor) -> None:
        """`commit` of one token per row (token, log_prob [B]): a live row always has room for it."""
        take = self.alive(rows)  # [B]
        start = self.lengths[rows]
        col = start.clamp(max=self.max_new_tokens - 1)
        self.ids[rows, col] = torch.where(take, token, self.ids[rows, col])
        self.log_probs[rows, col] = torch.where(take, log_prob.float(), self.log_probs[rows, col])
        self._advance(rows, start + take, take & torch.isin(token, self.stop_ids))

    def _advance(self, rows: torch.Tensor, lengths: torch.Tensor, stopped: torch.Tensor) -> None:
        self.lengths[rows] = lengths
        self.stopped[rows] |= stopped
        self.finished[rows] |= stopped | (lengths >= self.max_new_tokens)

    def finish_reasons(self) -> list[str]:
        return ["stop" if s else "length" for s in self.stopped.tolist()]


def compact(state: DecodeState, buffer: ResponseBuffer) -> DecodeState | None:
    """Drop finished rows and squeeze out holes once worthwhile; None when no row is left."""
    alive = buffer.alive(state.rows)
    n_alive = int(alive.sum())
    if n_alive == 0:
        return None
    if n_alive <= (1 - COMPACT_FRACTION) * alive.numel():
        state = state.select(alive.nonzero().squeeze(1))
    slots = state.mask.shape[1]
    if slots >= REPACK_MIN_SLOTS and int(state.mask.sum(1).max()) <= (1 - REPACK_HOLES) * slots:
        state.repack()
    return state


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as a left-padded batch: ids [U, P] (pad_id in the padding) and mask [U, P] bool."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = True
    return ids.to(device), mask.to(device)


def prefill(model: MTPCausalLM, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, SlotCache]:
    """Run the trunk over the unique prompts [U, P]: (hidden [U, P, d], position ids [U, P], cache)."""
    pos = model.position_ids(prompt_mask)
    with grouped_query_sdpa(model.device):
        hidden, cache = model.trunk(prompt_ids, prompt_mask.long(), pos, SlotCache(), use_cache=True)
    return hidden, pos, cache
