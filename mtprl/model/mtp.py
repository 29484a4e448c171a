"""`MTPCausalLM`: any Hugging Face causal LM plus K multi-token-prediction layers.

Layout (DESIGN §2, MiMo / DeepSeek-V3). Depth k (1-based) at source position i:
    h^k_i = Block_k( input_proj_k( concat[ hidden_layernorm(s^{k-1}_i), token_layernorm(e_i) ] ) )
    logits = lm_head( final_layernorm(h^k_i) )          -> predicts x_{i+k+1}
with e_i = Emb(x_{i+k}) (zeros at position 0 where the layout says so, as vLLM does), s^0 the
trunk's last state before or after its final norm, s^k (k ≥ 1) h^k before or after depth k's
final_layernorm, and the concat order [hidden, token] or [token, hidden]: all four per model
family, recorded in `MTPLayout` (`mtprl.model.layout`, which cites the reference code). The
default, MiMo's: s^0 before the final norm, [hidden, token], position 0's token zeroed.
Block_k is one decoder layer of the base model's own class; Emb and lm_head are the base's.

`trunk()` returns s^0, the state depth 1 reads, and `logits()` maps it to the main head's logits
(applying the final norm when s^0 precedes it), so callers never apply the norm themselves.

Alignment (DESIGN §1): every returned tensor is indexed by *target* position t. The main head's
entry at t is log p(x_t | x_<t) (from h_{t-1}); depth k's entry at t is its log-prob of the same
x_t, formed from source position t-k-1. Position t is valid for depth k (main head: k = 0) when
both x_t and x_{t-k-1} are real tokens, so the first k+1 tokens of each sequence are never scored.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask

from mtprl.model.layout import HIDDEN_TOKEN, POST_NORM, PRE_NORM, MTPLayout, layout_of
from mtprl.model.logprobs import chunked_target_log_probs

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _cache_name(fn) -> str:
    """The keyword `fn` takes the KV cache as: transformers 5.2x renamed `past_key_values` to `cache`
    (the old name still works there, with a FutureWarning at every start)."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def _output_cache(out):
    """The KV cache of a model output, under whichever name this transformers version gives it."""
    return out.cache if "cache" in {f.name for f in dataclasses.fields(out)} else out.past_key_values


@dataclasses.dataclass
class LogProbs:
    """Per-token outputs of `MTPCausalLM.token_log_probs`, all indexed by target position t."""

    log_probs: torch.Tensor  # [B, L] main head's log p(x_t | x_<t); 0 where invalid
    mask: torch.Tensor  # [B, L] bool, main head can score t
    mtp_log_probs: torch.Tensor  # [K, B, L] depth-k head's log-prob of x_t; 0 where invalid
    mtp_mask: torch.Tensor  # [K, B, L] bool
    mtp_top1: torch.Tensor  # [K, B, L] bool, depth-k head's argmax equals x_t
    entropy: torch.Tensor | None = None  # [B, L] main head's entropy at t (no grad), if asked


@dataclasses.dataclass
class DetachSwitches:
    """Where the MTP path stops gradient into shared parameters (set per regime by `apply_regime`)."""

    hidden: bool = False  # trunk hidden states fed to depth 1
    embedding: bool = False  # token embedding lookups of the MTP path
    head: bool = False  # shared output head applied to MTP states


class MTPLayer(nn.Module):
    """One MTP depth: two RMSNorms, concat, Linear(2d→d, no bias), a decoder layer, a final RMSNorm."""

    def __init__(self, config: PretrainedConfig, block: nn.Module, norm_cls: type, layout: MTPLayout):
        super().__init__()
        d, eps = config.hidden_size, getattr(config, "rms_norm_eps", 1e-6)
        self.hidden_layernorm = norm_cls(d, eps=eps)
        self.token_layernorm = norm_cls(d, eps=eps)
        self.input_proj = nn.Linear(2 * d, d, bias=False)
        self.block = block
        self.final_layernorm = norm_cls(d, eps=eps)
        self.hidden_first = layout.concat_order == HIDDEN_TOKEN
        self.zero_first_token = layout.zero_first_token

    def forward(self, prev_hidden, token_embeds, *, attention_mask, position_ids, position_embeddings,
                past_key_values=None, use_cache=False):
        if self.zero_first_token:  # the token beside position 0's state is not an input (vLLM)
            token_embeds = token_embeds.masked_fill((position_ids == 0)[..., None], 0.0)
        h, e = self.hidden_layernorm(prev_hidden), self.token_layernorm(token_embeds)
        x = self.input_proj(torch.cat([h, e] if self.hidden_first else [e, h], dim=-1))  # [B, L, d]
        out = self.block(x, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                         position_embeddings=position_embeddings,
                         **{_cache_name(type(self.block).forward): past_key_values})
        return out[0] if isinstance(out, tuple) else out


def _as_base_model(base) -> PreTrainedModel:
    if isinstance(base, PreTrainedModel):
        return base
    if isinstance(base, PretrainedConfig):
        return AutoModelForCausalLM.from_config(base)
    raise TypeError(
        f"MTPCausalLM wraps a Hugging Face causal LM instance or config, got {type(base).__name__}; "
        "to load a checkpoint directory use MTPCausalLM.from_pretrained(path)"
    )


class MTPCausalLM(nn.Module):
    """A causal LM (`self.base`) with `num_mtp` MTP layers (`self.mtp_layers`) in layout `self.layout`."""

    def __init__(self, base: PreTrainedModel | PretrainedConfig, num_mtp_layers: int = 1,
                 layout: MTPLayout | None = None):
        super().__init__()
        if not isinstance(num_mtp_layers, int) or num_mtp_layers < 1:
            raise ValueError(f"num_mtp_layers must be an integer >= 1 (got {num_mtp_layers!r}); "
                             "use the `frozen` regime to train without an MTP term")
        self.base = _as_base_model(base)
        self.layout = layout or layout_of(self.config, fresh=True)
        if self.layout.naming == "qwen3_next" and num_mtp_layers > 1:
            raise ValueError("Qwen3-Next's MTP layers share one input projection and norms, so mtprl maps one "
                             f"layer only (asked for {num_mtp_layers}); use num_mtp_layers=1")
        inner = self.base.get_decoder()
        head = self.base.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("output heads with a bias are not supported (MiMo, DeepSeek, Qwen, Llama have none)")
        block_cls, norm_cls = type(inner.layers[0]), type(inner.norm)
        self.mtp_layers = nn.ModuleList(
            MTPLayer(self.config, self._new_block(block_cls, k), norm_cls, self.layout) for k in range(num_mtp_layers)
        )
        self.detach = DetachSwitches()
        self.config.num_nextn_predict_layers = num_mtp_layers
        self.config.mtp_layout = self.layout.to_dict()
        self.to(device=self.base.device, dtype=self.base.dtype)

    def _new_block(self, block_cls: type, k: int) -> nn.Module:
        # Built as the layer index whose per-layer settings an MTP block of this family has
        # (layer 0 for uniform trunks; after the trunk for DeepSeek/GLM, whose MTP blocks are MoE;
        # a full-attention layer for Qwen3-Next); its attention caches as layer k of the separate
        # MTP cache used during drafting.
        block = block_cls(self.config, self._block_index(k))
        if hasattr(block, "self_attn"):
            block.self_attn.layer_idx = k
        return block

    def _block_index(self, k: int) -> int:
        if self.layout.naming == "deepseek":
            return self.config.num_hidden_layers + k
        if self.layout.naming == "qwen3_next":
            return max(i for i, t in enumerate(self.config.layer_types) if t == "full_attention")
        return 0

    # ----- basic accessors -------------------------------------------------------------------
    @property
    def config(self) -> PretrainedConfig:
        return self.base.config

    @property
    def num_mtp(self) -> int:
        return len(self.mtp_layers)

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def vocab_size(self) -> int:
        return self.base.get_output_embeddings().weight.shape[0]

    def shared_parameters(self) -> list[nn.Parameter]:
        """θ_s: trunk, token embedding and output head (each tied tensor once)."""
        return list(self.base.parameters())

    def mtp_parameters(self) -> list[nn.Parameter]:
        """φ: parameters used only by the MTP layers."""
        return list(self.mtp_layers.parameters())

    def set_detach(self, hidden: bool | None = None, embedding: bool | None = None, head: bool | None = None):
        """Switch gradient stops on the MTP path; arguments left as None keep their setting."""
        for name, value in (("hidden", hidden), ("embedding", embedding), ("head", head)):
            if value is not None:
                setattr(self.detach, name, bool(value))
        return self

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        """The base model's own forward (logits etc.), so HF-style callers can use this module."""
        return self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ----- building blocks (also used by the rollout engine) ---------------------------------
    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Validate ids and mask; return the mask as a bool tensor of the ids' shape."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}) for this model's vocabulary; got range "
                f"[{int(input_ids.min())}, {int(input_ids.max())}] — was the text encoded with this model's tokenizer?"
            )
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                             f"shape {tuple(input_ids.shape)}; pass one 0/1 entry per token")
        return attention_mask.bool()

    @staticmethod
    def position_ids(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
        """Positions counted over real tokens only, so left padding does not shift them. [B, L]"""
        return (mask.long().cumsum(-1) - 1).clamp(min=0) + offset

    def embed(self, ids: torch.Tensor, *, for_mtp: bool = False) -> torch.Tensor:
        emb = self.base.get_input_embeddings()
        if for_mtp and self.detach.embedding:
            return nn.functional.embedding(ids, emb.weight.detach(), emb.padding_idx)
        return emb(ids)

    def head_weight(self, *, for_mtp: bool = False) -> torch.Tensor:
        w = self.base.get_output_embeddings().weight
        return w.detach() if for_mtp and self.detach.head else w

    def trunk(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=False):
        """Trunk states s^0 as depth 1 reads them ([B, L, d]; `logits()` turns them into the main head's) and the cache."""
        inner = self.base.get_decoder()
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": use_cache, _cache_name(type(inner).forward): past_key_values}
        if self.layout.hidden_source == POST_NORM:
            out = inner(**kwargs)
            return out.last_hidden_state, _output_cache(out)
        seen = []  # the final norm's input: the last decoder layer's output

        def grab(_module, args, kwargs):
            seen.append(args[0] if args else next(iter(kwargs.values())))

        handle = inner.norm.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = inner(**kwargs)
        finally:
            handle.remove()
        return seen[-1], _output_cache(out)

    def head_input(self, states: torch.Tensor) -> torch.Tensor:
        """What the main output head multiplies: trunk states from `trunk()` after the final norm."""
        if self.layout.hidden_source == PRE_NORM:
            return self.base.get_decoder().norm(states)
        return states

    def mtp_hidden(self, k: int, prev_hidden, next_ids, attention_mask, position_ids,
                   past_key_values=None, use_cache=False) -> torch.Tensor:
        """Depth k+1 (k 0-based) states from the previous depth's states and the ids one step ahead.

        prev_hidden [B, L, d] at source positions i; next_ids [B, L] holds x_{i+k+1} for each i.
        attention_mask: the 2-D 0/1 mask over the cache and these positions (as for the trunk).
        """
        if k == 0 and self.detach.hidden:
            prev_hidden = prev_hidden.detach()
        embeds = self.embed(next_ids, for_mtp=True)
        inner = self.base.get_decoder()
        mask4d = create_causal_mask(config=self.config, inputs_embeds=embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, **{_cache_name(create_causal_mask): past_key_values})
        rope = inner.rotary_emb(embeds, position_ids)
        return self.mtp_layers[k](prev_hidden, embeds, attention_mask=mask4d, position_ids=position_ids,
                                  position_embeddings=rope, past_key_values=past_key_values, use_cache=use_cache)

    def mtp_carry(self, k: int, hidden_k: torch.Tensor) -> torch.Tensor:
        """The state depth k+1 (k 0-based) passes on to depth k+2, or to its own next draft step."""
        if self.layout.chain_source == POST_NORM:
            return self.mtp_layers[k].final_layernorm(hidden_k)
        return hidden_k

    def mtp_logits(self, k: int, hidden_k: torch.Tensor) -> torch.Tensor:
        """Full logits of depth k+1 (k 0-based) from its states; for drafting a few positions."""
        return self.mtp_layers[k].final_layernorm(hidden_k) @ self.head_weight(for_mtp=True).T

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Main-head logits from trunk states as `trunk()` returns them."""
        return self.base.get_output_embeddings()(self.head_input(states))

    # ----- the training-time forward ---------------------------------------------------------
    def token_log_probs(self, input_ids, attention_mask=None, *, temperature: float = 1.0,
                        with_entropy: bool = False, mtp: bool = True, chunk_size: int = 1024) -> LogProbs:
        """Main and per-depth log-probs of the given tokens, aligned by target position (module doc).

        input_ids [B, L]; attention_mask [B, L] 0/1 (left or right padding, real tokens contiguous).
        Full-vocabulary logits are formed `chunk_size` rows at a time, never for the whole batch.
        `mtp=False` skips the MTP layers (their outputs are then zeros with an all-False mask).
        """
        mask = self.check_inputs(input_ids, attention_mask)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
        B, L = input_ids.shape
        pos = self.position_ids(mask)
        hidden, _ = self.trunk(input_ids, mask.long(), pos)  # [B, L, d]

        valid = torch.zeros_like(mask)
        valid[:, 1:] = mask[:, 1:] & mask[:, :-1]
        src = self.head_input(hidden[:, :-1][valid[:, 1:]])  # [N, d] rows h_{t-1} for valid t
        lp, ent, _ = chunked_target_log_probs(src, self.head_weight(), input_ids[valid], temperature=temperature,
                                              chunk_size=chunk_size, with_entropy=with_entropy)
        log_probs = self._scatter(lp, valid)
        entropy = self._scatter(ent, valid) if with_entropy else None

        K = self.num_mtp if mtp else 0
        mtp_lp = hidden.new_zeros(self.num_mtp, B, L, dtype=torch.float32)
        mtp_mask = torch.zeros(self.num_mtp, B, L, dtype=torch.bool, device=mask.device)
        mtp_top1 = torch.zeros_like(mtp_mask)
        per_depth, prev = [], hidden
        for k in range(K):
            shift = k + 1  # depth k+1 at source i reads x_{i+k+1}, predicts x_{i+k+2}
            next_ids = torch.full_like(input_ids, self.config.pad_token_id or 0)
            next_ids[:, :-shift] = input_ids[:, shift:]
            if k:
                prev = self.mtp_carry(k - 1, prev)
            prev = self.mtp_hidden(k, prev, next_ids, mask.long(), pos)  # [B, L, d]
            v = torch.zeros_like(mask)
            v[:, shift + 1:] = mask[:, shift + 1:] & mask[:, : L - shift - 1]
            normed = self.mtp_layers[k].final_layernorm(prev[:, : L - shift - 1][v[:, shift + 1:]])
            klp, _, ktop = chunked_target_log_probs(normed, self.head_weight(for_mtp=True), input_ids[v],
                                                    temperature=temperature, chunk_size=chunk_size)
            per_depth.append(self._scatter(klp, v))
            mtp_mask[k], mtp_top1[k] = v, self._scatter(ktop, v).bool()
        if per_depth:
            mtp_lp = torch.stack(per_depth + [mtp_lp[k] for k in range(K, self.num_mtp)])
        return LogProbs(log_probs, valid, mtp_lp, mtp_mask, mtp_top1, entropy)

    @staticmethod
    def _scatter(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Place per-row values [N] at the True entries of `where` [B, L]; zeros elsewhere."""
        out = values.new_zeros(where.shape)
        return out.masked_scatter(where, values)

    # ----- checkpoints -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, tokenizer=None) -> Path:
        from mtprl.model.checkpoint import save_mtp_checkpoint

        return save_mtp_checkpoint(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path, num_mtp_layers: int | None = None, dtype=None) -> "MTPCausalLM":
        """A local checkpoint, its MTP layers mapped by the family's layout (fresh ones if it has none)."""
        from mtprl.model.checkpoint import load_mtp_checkpoint

        return load_mtp_checkpoint(cls, path, num_mtp_layers=num_mtp_layers, dtype=dtype)

    @classmethod
    def from_config(cls, config: PretrainedConfig | dict, num_mtp_layers: int = 1) -> "MTPCausalLM":
        if isinstance(config, dict):
            config = AutoConfig.for_model(**config)
        return cls(config, num_mtp_layers)
