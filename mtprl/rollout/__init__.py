"""Rollout engine: batched sampling with a KV cache and speculative decoding with MTP drafts (token ids only)."""

from mtprl.rollout.engine import Rollout, generate
from mtprl.rollout.sampling import (
    PromptGenerators, SamplingParams, filtered_log_probs, greedy_accept, policy_log_probs, speculative_accept,
)

__all__ = [
    "PromptGenerators", "Rollout", "SamplingParams", "filtered_log_probs", "generate", "greedy_accept",
    "policy_log_probs", "speculative_accept",
]
