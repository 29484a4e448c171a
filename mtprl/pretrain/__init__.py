"""Pre-training of the embedded default: its own room beside the RL trainer.

- config:   `PretrainConfig` (every setting of `mtprl pretrain`)
- data:     generated solution traces, some deliberately imperfect, batched by length
- loop:     `train_base` / `pretrain` (NTP + MTP cross-entropy, `mtprl.losses.pretrain`)
- evaluate: the base on the held-out suites (greedy pass@1, MTP agreement)
- cache:    `ensure_base_model` (the cached base for a config, pre-trained on first use)
- command:  `mtprl pretrain`

Importing this package loads only the config and the cache (no torch); the loop is imported
when a base has to be trained.
"""

from mtprl.pretrain.cache import FORMAT_VERSION, base_model_dir, cache_key, ensure_base_model, load_summary
from mtprl.pretrain.config import PretrainConfig

__all__ = ["FORMAT_VERSION", "PretrainConfig", "base_model_dir", "cache_key", "ensure_base_model", "load_summary"]
