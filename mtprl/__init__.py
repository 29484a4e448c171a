"""mtprl: RL from verifiable rewards for language models with multi-token-prediction heads."""

__version__ = "0.1.0"
