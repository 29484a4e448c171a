"""Which inputs each model family's MTP layer reads, and how its checkpoints name the weights.

An MTP layer trained on one input computes something else, plausibly, when fed another: a
real checkpoint must be run with the convention it was trained with. The conventions below
follow vLLM 0.32's serving code for each family (the code that reaches the acceptance rates
the model cards report; the MiMo module there was contributed by Xiaomi):

| family | depth-1 reads the trunk state | concat | token at position 0 | depth k+1 reads depth k | weights |
|---|---|---|---|---|---|
| MiMo (`mimo.py`, `mimo_mtp.py`) | before the final norm (`MiMoModel` returns `hidden + residual`) | [hidden, token] | zeroed | (one layer only) | `model.mtp_layers.N.*` |
| DeepSeek-V3/R1 (`deepseek_v2.py`, `deepseek_mtp.py`) | after the final norm | [token, hidden] | zeroed | after `shared_head.norm` | `model.layers.{L+N}.{enorm,hnorm,eh_proj,shared_head.norm}` |
| GLM-4 MoE (`glm4_moe.py`, `glm4_moe_mtp.py`) | after the final norm | [token, hidden] | zeroed | before `shared_head.norm` | as DeepSeek |
| Qwen3-Next (`qwen3_next.py`, `qwen3_next_mtp.py`) | after the final norm | [token, hidden] | kept | after `mtp.norm` | `mtp.{pre_fc_norm_hidden,pre_fc_norm_embedding,fc,norm,layers.0.*}` |

Megatron-LM (the authors' RL-MTP patch runs MiMo through it) concatenates [token, hidden]; its
MiMo converters swap the two halves of `input_proj` accordingly, so the order above is MiMo's
own. A base model without MTP weights (Qwen2, Llama, Qwen3, ...) gets fresh layers in MiMo's
layout, so that a Qwen2 trunk exports as a checkpoint vLLM serves as `MiMoForCausalLM`.

The layout travels with the model: `config.json` records it as `mtp_layout`, and a checkpoint
that records one is run with it whatever its family. Departure: checkpoints written by mtprl
0.1 (which fed depth 1 the post-norm state and kept the position-0 token) carry MiMo-named
weights without `mtp_layout`; they are recognised and keep their convention (`LEGACY_MTPRL`).
"""

from __future__ import annotations

import dataclasses

PRE_NORM, POST_NORM = "pre_norm", "post_norm"
HIDDEN_TOKEN, TOKEN_HIDDEN = "hidden_token", "token_hidden"
NAMINGS = ("mimo", "deepseek", "qwen3_next")


@dataclasses.dataclass(frozen=True)
class MTPLayout:
    """How an MTP depth forms its input, and how a checkpoint names its weights."""

    hidden_source: str = PRE_NORM  # trunk state fed to depth 1: before (pre_norm) or after the final norm
    chain_source: str = PRE_NORM  # depth k's state fed to depth k+1: before or after that depth's final norm
    concat_order: str = HIDDEN_TOKEN  # hidden_token: concat[norm(h), norm(e)]; token_hidden: concat[norm(e), norm(h)]
    zero_first_token: bool = True  # the token embedding at position 0 is replaced by zeros (vLLM)
    naming: str = "mimo"  # checkpoint names of the MTP weights: mimo | deepseek | qwen3_next

    def __post_init__(self):
        for name, value, allowed in (("hidden_source", self.hidden_source, (PRE_NORM, POST_NORM)),
                                     ("chain_source", self.chain_source, (PRE_NORM, POST_NORM)),
                                     ("concat_order", self.concat_order, (HIDDEN_TOKEN, TOKEN_HIDDEN)),
                                     ("naming", self.naming, NAMINGS)):
            if value not in allowed:
                raise ValueError(f"mtp_layout.{name} = {value!r} is not one of {list(allowed)}; "
                                 "fix config.json's mtp_layout or drop it to use the family's own layout")
        if not isinstance(self.zero_first_token, bool):
            raise ValueError(f"mtp_layout.zero_first_token must be true or false, got {self.zero_first_token!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MTPLayout":
        if not isinstance(data, dict):
            raise ValueError(f"config.json's mtp_layout must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config.json's mtp_layout has unknown keys {unknown}; "
                             f"known: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**data)


MIMO = MTPLayout()
DEEPSEEK = MTPLayout(hidden_source=POST_NORM, chain_source=POST_NORM, concat_order=TOKEN_HIDDEN, naming="deepseek")
GLM4_MOE = dataclasses.replace(DEEPSEEK, chain_source=PRE_NORM)
QWEN3_NEXT = MTPLayout(hidden_source=POST_NORM, chain_source=POST_NORM, concat_order=TOKEN_HIDDEN,
                       zero_first_token=False, naming="qwen3_next")
LEGACY_MTPRL = MTPLayout(hidden_source=POST_NORM, zero_first_token=False)

# model_type -> layout of the family's own MTP weights.
FAMILIES: dict[str, MTPLayout] = {
    "mimo": MIMO,
    "deepseek_v3": DEEPSEEK,  # DeepSeek-V3, R1, Kimi-K2
    "glm4_moe": GLM4_MOE,
    "qwen3_next": QWEN3_NEXT,
}
# Config fields through which a family declares MTP layers of its own.
_MTP_COUNT_FIELDS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "mtp_num_layers")


def declared_mtp_layers(config) -> int:
    """How many MTP layers the config says the checkpoint carries (0 if it says nothing)."""
    return max(int(getattr(config, f, 0) or 0) for f in _MTP_COUNT_FIELDS)


def layout_of(config, *, has_mimo_weights: bool = False, fresh: bool = False) -> MTPLayout:
    """The layout a checkpoint was trained with: recorded, else its family's, else MiMo's for fresh layers.

    Unless `fresh` (layers about to be initialised, not loaded), a config that declares MTP layers
    of a family not mapped here is refused: running them with a guessed convention would give
    plausible, wrong numbers.
    """
    recorded = getattr(config, "mtp_layout", None)
    if recorded is not None:
        return MTPLayout.from_dict(dict(recorded))
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if has_mimo_weights:
        return LEGACY_MTPRL  # MiMo-named weights beside a non-MiMo trunk, no layout: written by mtprl 0.1
    if declared_mtp_layers(config) and not fresh:
        raise ValueError(
            f"this '{model_type}' checkpoint declares {declared_mtp_layers(config)} MTP layer(s) in a layout mtprl "
            f"does not map (mapped families: {sorted(FAMILIES)}); running them with a guessed convention would "
            "give wrong log-probs. Record the layout as `mtp_layout` in config.json (fields: "
            f"{[f.name for f in dataclasses.fields(MTPLayout)]}) or remove the MTP fields to start fresh MTP layers"
        )
    return MIMO
