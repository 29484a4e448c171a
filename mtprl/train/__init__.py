"""Training: the RL loop of `mtprl train` (pre-training of the embedded default is `mtprl.pretrain`)."""

from mtprl.train.config import TrainConfig
from mtprl.train.loop import train

__all__ = ["TrainConfig", "train"]
