"""A KV cache that writes into preallocated storage instead of concatenating on every step.

`transformers`' `DynamicLayer` grows by `torch.cat`, which copies the whole cache on every
decode step (on the tiny default that copy was ~40% of CPU decode time). `SlotLayer` keeps
storage with spare capacity, doubling when full, writes new slots in place and returns views of
the filled part; crop, batch selection and repetition act on the same storage, and
`select_slots` repacks each row's slots (used to squeeze out masked-out holes). Every layer is a
full-attention layer: models with sliding-window layers still get correct masks (the window is
applied by the mask), only without the window's memory saving.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_CAPACITY = 64  # slots allocated at first use


class SlotLayer(DynamicLayer):
    """Keys / values [B, H, capacity, d] with `length` filled slots; `keys` / `values` view the filled part."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self._k = self._v = None

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        if self._k is not None and needed <= self._k.shape[2]:
            return
        capacity = max(needed, MIN_CAPACITY, 0 if self._k is None else 2 * self._k.shape[2])
        B, H, _, dk = key_states.shape
        k = key_states.new_empty(B, H, capacity, dk)
        v = value_states.new_empty(B, H, capacity, value_states.shape[-1])
        if self.length:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        self._reserve(key_states, value_states, end)
        self._k[:, :, self.length: end] = key_states
        self._v[:, :, self.length: end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last |tokens_to_remove| slots (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of slots to remove, got {tokens_to_remove}")
        if self.is_initialized and tokens_to_remove:
            self.length = max(self.length + tokens_to_remove, 0)
            self._views()

    def _reindex(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (copying only the filled slots into storage of the same capacity)."""
        if self.get_seq_length() > 0:
            k = self._k.new_empty(index.numel(), *self._k.shape[1:])
            v = self._v.new_empty(index.numel(), *self._v.shape[1:])
            k[:, :, : self.length] = self._k[index, :, : self.length]
            v[:, :, : self.length] = self._v[index, :, : self.length]
            self._k, self._v = k, v
            self._views()

    def select_slots(self, index: torch.Tensor) -> None:
        """Keep, per batch row, the slots index [B, W] (in that order) as the first W slots."""
        if self.get_seq_length() == 0:
            return
        B, H, _, dk = self._k.shape
        width = index.shape[1]
        idx = index[:, None, :, None]  # [B, 1, W, 1]
        k = self._k[:, :, : self.length].gather(2, idx.expand(B, H, width, dk))
        v = self._v[:, :, : self.length].gather(2, idx.expand(B, H, width, self._v.shape[-1]))
        self._k[:, :, :width], self._v[:, :, :width] = k, v
        self.length = width
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._reindex(torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reindex(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reindex(beam_idx)

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None
        self.length = 0


class SlotCache(Cache):
    """A cache of `SlotLayer`s, one per attention layer index, created on first use."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=SlotLayer)

    def select_slots(self, index: torch.Tensor) -> None:
        """Keep slots index [B, W] of every row in every layer (see `SlotLayer.select_slots`)."""
        for layer in self.layers:
            layer.select_slots(index)
