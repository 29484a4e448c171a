"""Input checks shared by the loss functions: each raises a ValueError naming the problem and the fix."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def check_choice(kind: str, value: str, options: Iterable[str]) -> None:
    """Raise if `value` is not one of `options` (an unknown mode, regime or estimator name)."""
    options = tuple(options)
    if value not in options:
        raise ValueError(f"unknown {kind} {value!r}; valid {kind}s: {', '.join(options)}")


def check_shape(name: str, tensor: Tensor, shape: torch.Size | tuple[int, ...], ref: str) -> None:
    """Raise if `tensor` does not have exactly `shape` (the shape of the tensor called `ref`)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"shape mismatch: {name} has shape {tuple(tensor.shape)} but {ref} has {tuple(shape)}; "
            f"pass tensors aligned position by position"
        )


def check_ndim(name: str, tensor: Tensor, ndim: int, layout: str) -> None:
    """Raise if `tensor` does not have `ndim` dimensions (`layout` names them, e.g. '[B, T]')."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must be {layout} ({ndim}-D), got shape {tuple(tensor.shape)}")


def as_mask(mask: Tensor, like: Tensor, name: str = "mask", ref: str = "log_prob") -> Tensor:
    """The validity mask as bool, checked to have `like`'s shape; any non-zero entry counts as valid."""
    check_shape(name, mask, like.shape, ref)
    return mask if mask.dtype == torch.bool else mask != 0


def check_non_negative(name: str, value: float) -> None:
    """Raise if `value` is negative (or not a number)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def check_count(name: str, value: int | float | Tensor | None) -> None:
    """Raise if a python-number normaliser (a global count or length) is not > 0; tensors are trusted."""
    if value is None or isinstance(value, Tensor):
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be > 0 (a count over the whole batch), got {value!r}")


def check_range(name: str, value: tuple[float, float] | None) -> None:
    """Raise if `value` is not None or a pair (lo, hi) with lo <= hi."""
    if value is None:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not value[0] <= value[1]:
        raise ValueError(f"{name} must be None or a pair (lo, hi) with lo <= hi, got {value!r}")
