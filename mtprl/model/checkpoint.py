"""Save and load `MTPCausalLM` in Hugging Face layout, MTP weights under MiMo's names.

A saved directory is a plain causal-LM checkpoint (config.json + safetensors) that
`AutoModelForCausalLM` loads as it is, ignoring the extra keys. The MTP layers are stored beside
the base weights as `model.mtp_layers.N.*` (MiMo naming: the decoder layer's own parameters sit
directly under the MTP layer, e.g. `model.mtp_layers.0.self_attn.q_proj.weight`), and the config
records `num_nextn_predict_layers`. A checkpoint that has fewer MTP layers than asked for (or
none) gets fresh ones: the decoder block is copied from the trunk's last layer (a warm start that
already reads the trunk's representation), the projection is drawn from N(0, initializer_range²)
and the norms start at one. Only safetensors weights are read for the MTP layers.

Serving (vLLM, `method: mtp`): vLLM picks its model class from `architectures`, AutoModelForCausalLM
from `model_type`. A Qwen2 trunk with MTP layers in MiMo's layout is saved with `architectures:
["MiMoForCausalLM"]` (vLLM's MiMo is Qwen2's trunk plus `model.mtp_layers.N.*`) and keeps
`model_type: qwen2`, so both load it. DeepSeek-V3, GLM-4 MoE and Qwen3-Next checkpoints keep their
own architecture, which vLLM drafts from natively. Any other pairing (e.g. a Llama trunk with fresh
MiMo-layout layers) saves for AutoModelForCausalLM, but vLLM has no MTP model for it:
`vllm_mtp_architecture` names the reason. The default's tokenizer is saved in its byte-level form
(`mtprl.model.tokenizer`), which AutoTokenizer reads back with our ids.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config
from transformers.utils import logging as hf_logging

from mtprl.model.layout import DEEPSEEK, GLM4_MOE, LEGACY_MTPRL, MIMO, QWEN3_NEXT, declared_mtp_layers, layout_of
from mtprl.model.tokenizer import export_tokenizer

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Our name of each non-block part of an MTP layer -> its name under each checkpoint naming.
_PART_NAMES = {
    "mimo": {"hidden_layernorm": "hidden_layernorm", "token_layernorm": "token_layernorm",
             "input_proj": "input_proj", "final_layernorm": "final_layernorm"},
    "deepseek": {"hidden_layernorm": "hnorm", "token_layernorm": "enorm", "input_proj": "eh_proj",
                 "final_layernorm": "shared_head.norm"},
    "qwen3_next": {"hidden_layernorm": "pre_fc_norm_hidden", "token_layernorm": "pre_fc_norm_embedding",
                   "input_proj": "fc", "final_layernorm": "norm"},
}
# Copies of shared tensors some namings store inside each MTP layer (DeepSeek-V3): checked, not loaded.
_SHARED_COPIES = {"embed_tokens.weight": "input", "shared_head.head.weight": "output"}


class _Names:
    """Checkpoint names of MTP layer k's tensors under one naming (`MTPLayout.naming`)."""

    def __init__(self, naming: str, num_hidden_layers: int):
        self.naming, self.parts, self.first = naming, _PART_NAMES[naming], num_hidden_layers
        self.inverse = {v: k for k, v in self.parts.items()}

    def part_prefix(self, k: int) -> str:
        return {"mimo": f"model.mtp_layers.{k}.", "deepseek": f"model.layers.{self.first + k}.",
                "qwen3_next": "mtp."}[self.naming]

    def block_prefix(self, k: int) -> str:
        return f"mtp.layers.{k}." if self.naming == "qwen3_next" else self.part_prefix(k)

    def stored(self, module_key: str) -> str:
        """`0.block.self_attn.q_proj.weight` -> e.g. `model.mtp_layers.0.self_attn.q_proj.weight`."""
        idx, rest = module_key.split(".", 1)
        k = int(idx)
        if rest.startswith("block."):
            return self.block_prefix(k) + rest[len("block."):]
        part, tail = rest.split(".", 1)
        return self.part_prefix(k) + self.parts[part] + "." + tail

    def parse(self, key: str) -> tuple[int, str] | None:
        """A stored key -> (k, module key), or None when the key is not an MTP weight of this naming."""
        if self.naming == "mimo":
            m = re.match(r"model\.mtp_layers\.(\d+)\.(.+)", key)
            return None if m is None else self._split(int(m.group(1)), m.group(2))
        if self.naming == "deepseek":
            m = re.match(r"model\.layers\.(\d+)\.(.+)", key)
            if m is None or int(m.group(1)) < self.first:
                return None
            return self._split(int(m.group(1)) - self.first, m.group(2))
        m = re.match(r"mtp\.layers\.(\d+)\.(.+)", key)
        if m is not None:
            return int(m.group(1)), f"{m.group(1)}.block.{m.group(2)}"
        return self._split(0, key[len("mtp."):]) if key.startswith("mtp.") else None

    def _split(self, k: int, rest: str) -> tuple[int, str]:
        if rest in _SHARED_COPIES:
            return k, "shared:" + rest
        for stored, ours in self.inverse.items():
            if rest.startswith(stored + "."):
                return k, f"{k}.{ours}{rest[len(stored):]}"
        return k, f"{k}.block.{rest}" if self.naming != "qwen3_next" else f"{k}.{rest}"


def mtp_state_dict(model) -> dict[str, torch.Tensor]:
    """MTP weights keyed by the checkpoint names of the model's layout."""
    names = _Names(model.layout.naming, model.config.num_hidden_layers)
    out = {names.stored(k): v.detach().contiguous().cpu() for k, v in model.mtp_layers.state_dict().items()}
    if model.layout.naming == "deepseek":  # DeepSeek-V3 checkpoints carry the shared head in every MTP layer
        head = model.base.get_output_embeddings().weight.detach().contiguous().cpu()
        for k in range(model.num_mtp):
            out[names.part_prefix(k) + "shared_head.head.weight"] = head.clone()
    return out


# (model_type, layout) -> the vLLM architecture that serves the checkpoint with its MTP layers as the drafter.
_VLLM_MTP = {("qwen2", MIMO): "MiMoForCausalLM", ("mimo", MIMO): "MiMoForCausalLM",
             ("deepseek_v3", DEEPSEEK): "DeepseekV3ForCausalLM", ("glm4_moe", GLM4_MOE): "Glm4MoeForCausalLM",
             ("qwen3_next", QWEN3_NEXT): "Qwen3NextForCausalLM"}


def vllm_mtp_architecture(config, layout) -> tuple[str | None, str]:
    """(vLLM architecture that drafts with these MTP layers, or None; the reason when None)."""
    arch = _VLLM_MTP.get((getattr(config, "model_type", None), layout))
    if arch is not None:
        return arch, ""
    if layout == LEGACY_MTPRL:
        return None, ("its MTP layers use mtprl 0.1's convention (post-norm trunk state, position-0 token kept), "
                      "which vLLM's MiMo does not compute; re-train or re-initialise the MTP layers")
    supported = sorted({m for m, _ in _VLLM_MTP})
    return None, (f"vLLM has no MTP drafter for a '{getattr(config, 'model_type', None)}' trunk with MTP layers in "
                  f"the {layout.naming} layout (served with MTP: {supported} in their own layouts; a qwen2 trunk "
                  "with MiMo-layout layers is served as MiMoForCausalLM)")


def save_mtp_checkpoint(model, directory: str | Path, tokenizer=None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.num_nextn_predict_layers = model.num_mtp
    model.config.mtp_layout = model.layout.to_dict()
    with quiet_transformers():
        model.base.save_pretrained(directory, safe_serialization=True)
    arch, _ = vllm_mtp_architecture(model.config, model.layout)
    if arch is not None:  # save_pretrained writes the class's own name; vLLM reads this field to pick its model
        config_file = directory / "config.json"
        fields = json.loads(config_file.read_text())
        fields["architectures"] = [arch]
        config_file.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    extra = mtp_state_dict(model)
    index_file = directory / "model.safetensors.index.json"
    if index_file.exists():  # sharded: the MTP layers get a shard of their own
        save_file(extra, directory / "model-mtp.safetensors", metadata={"format": "pt"})
        index = json.loads(index_file.read_text())
        index["weight_map"].update({k: "model-mtp.safetensors" for k in extra})
        index_file.write_text(json.dumps(index, indent=2))
    else:
        single = directory / "model.safetensors"
        with safe_open(single, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors.update(extra)
        save_file(tensors, single, metadata={"format": "pt"})
    if tokenizer is not None:
        export_tokenizer(tokenizer).save_pretrained(directory)
    return directory


def _stored_keys(directory: Path) -> dict[str, Path]:
    keys = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            keys.update({key: file for key in f.keys()})
    return keys


def _read(file: Path, key: str) -> torch.Tensor:
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(key)


def _check_safetensors_file(file: Path) -> None:
    """A safetensors file holds a JSON header and then exactly the bytes its tensors' offsets need."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            if not 0 < length <= size - 8:
                raise ValueError
            header = json.loads(handle.read(length))
            need = 8 + length + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                                    default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            raise ValueError(f"weight file '{file}' is not a readable safetensors file (damaged or cut short); "
                             "re-save or re-download the checkpoint") from None
    if size < need:
        raise ValueError(f"weight file '{file}' is truncated ({size:,} of {need:,} bytes); re-save or re-download "
                         "the checkpoint")


def check_checkpoint_dir(path: str | Path) -> None:
    """Cheap checks that `path` is a loadable checkpoint directory: config.json, weights, whole safetensors files.

    Reads only file sizes and safetensors headers (no tensors, no torch), so it runs before anything
    expensive; raises FileNotFoundError / NotADirectoryError / ValueError naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path '{path}' does not exist; pass a local Hugging Face model directory")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint path '{path}' is a file; pass the directory that holds config.json")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"'{path}' has no config.json; it is not a Hugging Face model directory")
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise FileNotFoundError(f"'{path}' has a config.json but no weight files (*.safetensors); "
                                "the download or save may be incomplete")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"'{path}' lacks the weight shard '{missing[0]}' that {index.name} names; "
                                    "the download or save may be incomplete")
    for file in sorted(path.glob("*.safetensors")):
        _check_safetensors_file(file)


def _load_trunk(path: Path, **kwargs):
    config = AutoConfig.from_pretrained(path) if _model_type(path) != "mimo" else _mimo_as_qwen2(path)
    with quiet_transformers():  # its load report would list every MTP key as "unexpected"
        return AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)


def _model_type(path: Path) -> str | None:
    return json.loads((path / "config.json").read_text()).get("model_type")


def _mimo_as_qwen2(path: Path):
    """MiMo's trunk is Qwen2's (its remote code subclasses it): load it as such, running no remote code."""
    fields = json.loads((path / "config.json").read_text())
    fields = {k: v for k, v in fields.items() if k not in ("model_type", "auto_map", "architectures")}
    config = Qwen2Config(**fields)
    config.mtp_layout = fields.get("mtp_layout", MIMO.to_dict())
    return config


def load_mtp_checkpoint(cls, path: str | Path, num_mtp_layers: int | None = None, dtype=None):
    path = Path(path)
    check_checkpoint_dir(path)
    base = _load_trunk(path, **({"dtype": dtype} if dtype is not None else {}))
    keys = _stored_keys(path)
    layout = layout_of(base.config, has_mimo_weights=any(k.startswith("model.mtp_layers.") for k in keys))
    names = _Names(layout.naming, base.config.num_hidden_layers)
    stored = {key: parsed for key in keys if (parsed := names.parse(key)) is not None}
    stored_layers = {k for k, _ in stored.values()}
    want = num_mtp_layers or declared_mtp_layers(base.config) or max(len(stored_layers), 1)
    model = cls(base, int(want), layout=layout)
    if layout == LEGACY_MTPRL:
        logger.warning("'%s' was written by mtprl 0.1 (no mtp_layout in config.json): its MTP layers keep that "
                       "version's convention (post-norm trunk state, position-0 token kept), which vLLM's MiMo "
                       "does not serve", path)
    own = model.mtp_layers.state_dict()
    loaded = {}
    for key, (k, mkey) in stored.items():
        if k >= model.num_mtp:
            continue
        tensor = _read(keys[key], key)
        if mkey.startswith("shared:"):
            _check_shared_copy(model, path, key, tensor, _SHARED_COPIES[mkey[len("shared:"):]])
            continue
        if mkey not in own:
            raise ValueError(f"checkpoint '{path}' has MTP weight '{key}' that this model's MTP layer lacks; "
                             "the MTP layers must use the base model's own decoder-layer type")
        if tuple(tensor.shape) != tuple(own[mkey].shape):
            raise ValueError(f"MTP weight '{key}' in '{path}' has shape {tuple(tensor.shape)} but the base model "
                             f"needs {tuple(own[mkey].shape)}; the MTP layers do not belong to this base model")
        loaded[mkey] = tensor
    for k in range(model.num_mtp):
        have = {m for m in loaded if m.startswith(f"{k}.")}
        need = {m for m in own if m.startswith(f"{k}.")}
        if have == need:
            continue
        if have:
            missing = [names.stored(m) for m in sorted(need - have)[:3]]
            raise ValueError(f"MTP layer {k} in '{path}' is incomplete (missing e.g. {missing}); "
                             "re-save the checkpoint or drop its MTP weights to start fresh")
        init_fresh_mtp_layer(model, k)
        logger.warning("MTP layer %d not found in '%s': initialised fresh (block copied from the trunk's last "
                       "layer, projection ~ N(0, %.3g^2), norms at their initial value)", k, path,
                       getattr(model.config, "initializer_range", 0.02))
    model.mtp_layers.load_state_dict({**own, **loaded})
    return model


def _check_shared_copy(model, path: Path, key: str, tensor: torch.Tensor, which: str) -> None:
    mine = (model.base.get_input_embeddings() if which == "input" else model.base.get_output_embeddings()).weight
    if tensor.shape != mine.shape or not torch.equal(tensor.to(mine.dtype), mine.detach().cpu()):
        raise ValueError(f"'{key}' in '{path}' differs from the trunk's {which} embedding; mtprl shares one "
                         "embedding and one output head between the trunk and its MTP layers")


@torch.no_grad()
def init_fresh_mtp_layer(model, k: int) -> None:
    """Fresh MTP layer k: block copied from the trunk's matching layer, N(0, σ²) projection, norms as initialised."""
    layer = model.mtp_layers[k]
    layers = model.base.get_decoder().layers
    twin = layers[model._block_index(k)] if model.layout.naming == "qwen3_next" else layers[-1]
    layer.block.load_state_dict(twin.state_dict())
    layer.input_proj.weight.normal_(0.0, getattr(model.config, "initializer_range", 0.02))
    for norm in (layer.hidden_layernorm, layer.token_layernorm, layer.final_layernorm):
        # A fresh norm of the same class: ones, or zeros for zero-centred norms (Qwen3-Next's 1 + w).
        norm.weight.copy_(type(norm)(norm.weight.shape[0]).weight)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars for the duration of a block."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
