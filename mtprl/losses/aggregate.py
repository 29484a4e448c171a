"""Masked reductions: how a per-token loss matrix becomes one loss, and metrics become python floats.

Every loss in this package is a per-token matrix `loss_mat [B, T]` reduced over the valid tokens of a
`mask [B, T]` (bool, or 0/1 numbers: any non-zero entry is valid). Positions outside the mask are
replaced by zero with `torch.where` before any sum, so whatever they hold (inf, nan) changes nothing.

Modes (B sequences, n_b valid tokens in sequence b, S = number of sequences with n_b > 0):
- token-mean               Σ_b Σ_t l / Σ_b n_b                (DAPO; the default)
- seq-mean-token-mean      (1/S) Σ_b (Σ_t l / n_b)            (original GRPO)
- seq-mean-token-sum       (1/S) Σ_b Σ_t l
- seq-mean-token-sum-norm  (1/S) Σ_b Σ_t l / L, L = norm_length a constant (Dr. GRPO; the paper's
  definition, averaged over sequences. verl's version omits the 1/S, i.e. differs by a constant.)
Sequences without a valid token are not counted in S (as in verl).

Gradient accumulation and data parallelism. When a mini-batch is split into micro-batches and/or
across data-parallel workers, pass the count over the *whole mini-batch* (all micro-batches on all
workers): `global_tokens` (token-mean) or `global_seqs` (seq-mean-*), obtained by summing
`valid_counts(mask)` over the pieces. The local sum is then divided by that global count, so each
call returns this piece's share: the shares, and their gradients, *add up* to the loss and gradient
of the whole mini-batch computed in one call. A data-parallel backend that *averages* gradients over
W workers (DDP, FSDP) divides by W, so multiply the loss by W there (verl does the same, `* dp_size`).
Without a global count the local count is used (the piece's own mean).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtprl.losses._validate import as_mask, check_choice, check_count, check_ndim

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

Count = int | float | Tensor


def aggregate(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    *,
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    norm_length: float | None = None,
) -> Tensor:
    """Reduce `loss_mat [B, T]` over the valid tokens of `mask [B, T]` to a 0-dim loss.

    `global_tokens` is used by token-mean only, `global_seqs` by the seq-mean-* modes, `norm_length`
    (required there) by seq-mean-token-sum-norm only; the others are ignored. With an empty mask and
    no global count the loss is 0.
    """
    check_choice("aggregation mode", mode, AGG_MODES)
    check_ndim("loss_mat", loss_mat, 2, "[B, T]")
    mask = as_mask(mask, loss_mat, ref="loss_mat")
    check_count("global_tokens", global_tokens)
    check_count("global_seqs", global_seqs)
    masked = torch.where(mask, loss_mat, 0.0)  # [B, T]
    if mode == "token-mean":
        denom = mask.sum().clamp(min=1) if global_tokens is None else global_tokens
        return masked.sum() / denom
    tokens_per_seq = mask.sum(-1)  # [B]
    seq_sum = masked.sum(-1)  # [B]
    if mode == "seq-mean-token-mean":
        per_seq = seq_sum / tokens_per_seq.clamp(min=1)  # [B]
    elif mode == "seq-mean-token-sum":
        per_seq = seq_sum
    else:
        if norm_length is None:
            raise ValueError(
                "aggregation mode 'seq-mean-token-sum-norm' needs norm_length (e.g. the max response length)"
            )
        check_count("norm_length", norm_length)
        per_seq = seq_sum / norm_length
    denom = (tokens_per_seq > 0).sum().clamp(min=1) if global_seqs is None else global_seqs
    return per_seq.sum() / denom


def valid_counts(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(tokens, sequences) counted the way `aggregate` counts them, to sum into global counts.

    `mask [B, T]` gives two 0-dim int64 tensors; a per-head `mask [K, B, T]` gives two `[K]` tensors.
    A sequence counts when it holds at least one valid token.
    """
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be [B, T] or [K, B, T], got shape {tuple(mask.shape)}")
    valid = mask if mask.dtype == torch.bool else mask != 0
    return valid.sum(dim=(-2, -1)), valid.any(-1).sum(-1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the valid entries of the bool `mask` (same shape); 0 when none is valid."""
    total = torch.where(mask, values.float() if not values.is_floating_point() else values, 0.0).sum()
    return total / mask.sum().clamp(min=1)


def masked_extremes(values: Tensor, mask: Tensor, empty: float) -> tuple[Tensor, Tensor]:
    """(min, max) of `values` over the valid entries of the bool `mask`; both `empty` when none is valid."""
    any_valid = mask.any()
    low = torch.where(mask, values, torch.inf).amin()
    high = torch.where(mask, values, -torch.inf).amax()
    return torch.where(any_valid, low, empty), torch.where(any_valid, high, empty)


def metrics_to_floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    """Detach 0-dim metric tensors and turn them into python floats with a single device sync."""
    if not metrics:
        return {}
    values = torch.stack([value.detach().float().reshape(()) for value in metrics.values()]).tolist()
    return dict(zip(metrics, values))
