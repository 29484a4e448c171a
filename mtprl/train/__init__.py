"""Training: pre-training of the embedded default (`mtprl.train.pretrain`) and the RL loop.

`TrainConfig` and `train` are imported on first use, so importing a submodule (say
`mtprl.train.command` for `mtprl train --help`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"TrainConfig": "mtprl.train.config", "train": "mtprl.train.loop"}
__all__ = ["TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtprl.train' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
