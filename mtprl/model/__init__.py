"""The MTP model: a Hugging Face causal LM with multi-token-prediction layers, and its tokenizer."""

from mtprl.model.logprobs import chunked_target_log_probs, naive_target_log_probs
from mtprl.model.mtp import DetachSwitches, LogProbs, MTPCausalLM, MTPLayer
from mtprl.model.regime import apply_regime
from mtprl.model.tiny import build_tiny_model, tiny_config
from mtprl.model.tokenizer import build_tokenizer, load_tokenizer

__all__ = [
    "DetachSwitches", "LogProbs", "MTPCausalLM", "MTPLayer", "apply_regime", "build_tiny_model", "build_tokenizer",
    "chunked_target_log_probs", "load_tokenizer", "naive_target_log_probs", "tiny_config",
]
