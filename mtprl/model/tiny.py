"""The embedded default: a small Qwen2-style causal LM with MTP layers, built in code."""

from __future__ import annotations

import torch
from transformers import Qwen2Config

from mtprl.model.mtp import MTPCausalLM


def tiny_config(tokenizer, *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                num_kv_heads: int = 2, intermediate_size: int | None = None, max_positions: int = 512) -> Qwen2Config:
    """A Qwen2 config sized for CPU training (defaults: about 1 M parameters with one MTP layer)."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}) and num_heads by "
                         f"num_kv_heads ({num_kv_heads})")
    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, rope_theta=10000.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa",
    )


def build_tiny_model(tokenizer, *, num_mtp_layers: int = 1, seed: int = 0, **config_kwargs) -> MTPCausalLM:
    """A freshly initialised tiny default (deterministic for a given seed), float32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MTPCausalLM(tiny_config(tokenizer, **config_kwargs), num_mtp_layers)
