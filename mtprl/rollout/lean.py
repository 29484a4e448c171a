"""A lean one-token decode step for Qwen2 / Llama / Qwen3 trunks, bit for bit the `transformers` forward.

`transformers`' model forward costs, per decoded token on the tiny default, about 1,200 aten calls
and as many Python frames (output capturing, config merging, the 4-D mask builder, kwarg
deprecation wrappers, cache bookkeeping), while the maths is ~50 small ops per layer. `decode_step`
runs the same maths on the same weights — the model's own modules for embeddings, norms, rotary
tables and MLPs, and, for attention, the exact op sequence of `transformers`' attention and SDPA
integration for one query token (projections, head reshapes, rotary, the GQA packing SDPA gets for
one query, the same `scaled_dot_product_attention` call) — writing keys and values into the
engine's preallocated `SlotCache`. Nothing is approximated: it returns the same hidden states as
`MTPCausalLM.trunk` to the last bit (tests/test_rollout_lean.py compares them across padding,
cache holes, GQA and MHA, pre- and post-norm layouts, and all three families), so sampled tokens
are identical under the same seed.

It is used only where that equality is known to hold: an exact Qwen2/Llama/Qwen3 model and decoder
class (a wrapped or sharded layer, e.g. FSDP2's, has another class), SDPA attention, full
attention in every layer, no forward hooks, eval mode. Anything else falls back to `trunk`.
`ENABLED = False` switches it off (the benchmarks' "before" path).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from mtprl.model import MTPCausalLM
from mtprl.model.layout import POST_NORM
from mtprl.rollout.cache import SlotCache

ENABLED = True  # False: always decode through `MTPCausalLM.trunk` (transformers' forward)

_FAMILIES = {  # decoder class -> decoder-layer class names this step reproduces
    "Qwen2Model": "Qwen2DecoderLayer",
    "LlamaModel": "LlamaDecoderLayer",
    "Qwen3Model": "Qwen3DecoderLayer",
}


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def supported(model: MTPCausalLM) -> bool:
    """Whether `decode_step` reproduces `model.trunk` exactly for this model (see the module doc)."""
    if not ENABLED or model.training:
        return False
    inner = model.base.get_decoder()
    layer_name = _FAMILIES.get(type(inner).__name__)
    config = model.config
    if layer_name is None or config._attn_implementation != "sdpa" or model.device.type not in ("cpu", "cuda"):
        return False
    if any(type(layer).__name__ != layer_name for layer in inner.layers):
        return False
    if len(inner.layers) != config.num_hidden_layers or getattr(inner, "has_sliding_layers", False):
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False
    if getattr(config, "pretraining_tp", 1) != 1:
        return False
    return not _has_hooks(inner)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _attention(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
               layer_cache) -> torch.Tensor:
    """`transformers`' attention forward + SDPA integration for one query token: x [B, 1, d] -> [B, 1, d]."""
    B = x.shape[0]
    shape = (B, 1, -1, attn.head_dim)
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(shape)
    k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(shape)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over the head dim before the transpose
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, 1, dh], [B, KV, 1, dh]
    v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(shape).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = (q * cos) + (_rotate_half(q) * sin)
    k = (k * cos) + (_rotate_half(k) * sin)
    keys, values = layer_cache.update(k, v)  # [B, KV, S, dh]
    groups = attn.num_key_value_groups
    kwargs = {}
    if groups > 1:  # as transformers' sdpa_attention_forward decides for a single query token
        if os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1" or (
                mask is None and keys.shape[-1] == values.shape[-1] <= 256):
            kwargs["enable_gqa"] = True
        else:  # pack_gqa: [B, H, 1, dh] -> [B, KV, groups, dh]; the mask [B, 1, 1, S] broadcasts
            q = q.reshape(B, q.shape[1] // groups, groups, q.shape[-1])
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0, scale=attn.scaling,
                                         is_causal=False, **kwargs)
    out = out.reshape(out.shape[0], -1, 1, values.shape[-1]).transpose(1, 2).contiguous()  # [B, 1, H, dh]
    out = out.reshape(B, 1, -1).contiguous()
    return F.linear(out, attn.o_proj.weight, attn.o_proj.bias)


@torch.no_grad()
def decode_step(model: MTPCausalLM, last: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor,
                cache: SlotCache) -> torch.Tensor:
    """`model.trunk(last[:, None], mask, next_pos[:, None], cache, use_cache=True)[0]`, leaner.

    last [B] token ids fed now; mask [B, S] 0/1 over the cache's slots *including* this token's
    (the last column); next_pos [B] their position ids. Writes this token's keys / values into
    every layer of `cache`. Returns the trunk states s^0 [B, 1, d] as `trunk` does.
    """
    inner = model.base.get_decoder()
    pos = next_pos[:, None]  # [B, 1]
    h = inner.embed_tokens(last[:, None])  # [B, 1, d]
    padding = mask.bool()
    # create_causal_mask for one query: None when no slot is masked (SDPA then runs unmasked), else
    # the padding mask as [B, 1, 1, S] bool (every cached slot precedes the query, so causality adds nothing).
    attn_mask = None if bool(padding.all()) else padding[:, None, None, :]
    cos, sin = inner.rotary_emb(h, pos)  # [B, 1, dh]
    for layer in inner.layers:
        residual = h
        a = _attention(layer.self_attn, layer.input_layernorm(h), cos, sin, attn_mask, cache.layers[layer.self_attn.layer_idx])
        h = residual + a
        residual = h
        h = residual + layer.mlp(layer.post_attention_layernorm(h))
    if model.layout.hidden_source == POST_NORM:
        return inner.norm(h)
    return h
