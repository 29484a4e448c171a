"""`rollout_backend: vllm`: the colocated vLLM engine of a training run, built from the model as it starts.

Every process runs its own engine (tensor parallel 1) and samples its share of each step's prompts
(`mtprl.train.rollouts.generate_shared`). The model is exported in HF layout (what vLLM serves) to a
directory that the engines load once: one unsharded process writes its own with `save_pretrained`; with
several processes, or sharded, rank 0 writes one export (`mtprl.train.export.export_hf`, streamed from the
shards one parameter at a time, so no process gathers the whole model) into a temporary directory in the
run directory (which every process must see, as its checkpoints), every process's engine reads it, and
rank 0 removes it once all engines have started. After every rollout batch's updates the trainer pushes all weights, MTP layers included, into
each running engine (`VLLMEngine.sync` of `mtprl.train.fsdp.iter_full_state`: all-gathered one
parameter at a time when sharded, handed to vLLM one decoder layer at a time), so each rollout samples
from the current policy.

vLLM inside a launched process group: vLLM 0.32's single-process executor re-uses the launched (gloo)
group and builds its tensor-parallel groups of one from it; its teardown destroys the default group,
so the trainer closes the engine last (`VLLMEngine.close`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mtprl.config import ConfigError


def start_engine(model, tokenizer, cfg, dist, run_dir: Path):
    """This process's VLLMEngine, serving `model`'s current weights; refuses what it cannot run, before vLLM
    starts. Collective when `model` is sharded (every rank calls it)."""
    from mtprl.model.checkpoint import vllm_mtp_architecture
    from mtprl.rollout.vllm_backend import VLLMEngine, VLLMSettings
    from mtprl.train.export import export_hf
    from mtprl.train.fsdp import is_sharded

    if cfg.draft_tokens:
        arch, why = vllm_mtp_architecture(model.config, model.layout)
        if arch is None:
            raise ConfigError(f"draft_tokens {cfg.draft_tokens} with rollout_backend vllm: {why}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype {cfg.dtype} is not served by the vLLM backend")
    settings = VLLMSettings(draft_tokens=cfg.draft_tokens, max_model_len=min(
        model.config.max_position_embeddings, cfg.max_prompt_tokens + cfg.max_new_tokens),
        kv_cache_bytes=cfg.vllm_kv_cache_mb << 20, dtype=cfg.dtype, seed=cfg.seed)
    if dist.world == 1 and not is_sharded(model):
        with tempfile.TemporaryDirectory(prefix="mtprl-vllm-") as directory:
            model.save_pretrained(directory, tokenizer=tokenizer)
            return VLLMEngine(directory, settings)
    directory = dist.broadcast_object(tempfile.mkdtemp(prefix=".vllm-start-", dir=run_dir) if dist.is_main
                                      else None)
    try:
        export_hf(model, directory, tokenizer=tokenizer, is_main=dist.is_main)
        dist.barrier()
        engine = VLLMEngine(directory, settings)
        dist.barrier()  # every engine has read the files
    finally:
        if dist.is_main:
            shutil.rmtree(directory, ignore_errors=True)
    return engine
