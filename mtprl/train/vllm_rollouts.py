"""`rollout_backend: vllm`: the colocated vLLM engine of a training run, built from the model as it starts.

The model is exported (`save_pretrained`, what vLLM serves) to a temporary directory that the engine
loads once; after every rollout batch's updates the trainer pushes all weights, MTP layers
included, into the running engine (`VLLMEngine.sync`), so each rollout samples from the current
policy. One process only: a sharded trainer would push full tensors layer by layer through
`VLLMEngine.push_weights`, which takes any iterable, but that path is not wired up here.
"""

from __future__ import annotations

import tempfile

from mtprl.config import ConfigError


def start_engine(model, tokenizer, cfg, world: int):
    """The run's VLLMEngine, serving `model`'s current weights; refuses what it cannot run, before vLLM starts."""
    from mtprl.model.checkpoint import vllm_mtp_architecture
    from mtprl.rollout.vllm_backend import VLLMEngine, VLLMSettings

    if world != 1:
        raise ConfigError(f"rollout_backend vllm runs in one process (this launch has {world}); launch one process "
                          "or use rollout_backend ours")
    if cfg.draft_tokens:
        arch, why = vllm_mtp_architecture(model.config, model.layout)
        if arch is None:
            raise ConfigError(f"draft_tokens {cfg.draft_tokens} with rollout_backend vllm: {why}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype {cfg.dtype} is not served by the vLLM backend")
    settings = VLLMSettings(draft_tokens=cfg.draft_tokens, max_model_len=min(
        model.config.max_position_embeddings, cfg.max_prompt_tokens + cfg.max_new_tokens),
        kv_cache_bytes=cfg.vllm_kv_cache_mb << 20, dtype=cfg.dtype, seed=cfg.seed)
    with tempfile.TemporaryDirectory(prefix="mtprl-vllm-") as directory:
        model.save_pretrained(directory, tokenizer=tokenizer)
        return VLLMEngine(directory, settings)
