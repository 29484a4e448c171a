"""Training: pre-training of the embedded default (`mtprl.train.pretrain`) and the RL loop."""

from mtprl.train.config import TrainConfig
from mtprl.train.loop import train

__all__ = ["TrainConfig", "train"]
