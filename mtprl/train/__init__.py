"""Training: the RL loop of `mtprl train` (pre-training of the embedded default is `mtprl.pretrain`).

`TrainConfig` and `train` are imported on first use, so importing a submodule (say
`mtprl.train.command` for `mtprl train --help`) does not import torch.
"""

from mtprl._lazy import lazy_exports

_LAZY = {"TrainConfig": "mtprl.train.config", "train": "mtprl.train.loop"}
__all__ = ["TrainConfig", "train"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
