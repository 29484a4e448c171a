"""Save and load `MTPCausalLM` in Hugging Face layout, MTP weights under MiMo's names.

A saved directory is a plain causal-LM checkpoint (config.json + safetensors) that
`AutoModelForCausalLM` loads as it is, ignoring the extra keys. The MTP layers are stored beside
the base weights as `model.mtp_layers.N.*` (MiMo naming: the decoder layer's own parameters sit
directly under the MTP layer, e.g. `model.mtp_layers.0.self_attn.q_proj.weight`), and the config
records `num_nextn_predict_layers`. A checkpoint that has fewer MTP layers than asked for (or
none) gets fresh ones: the decoder block is copied from the trunk's last layer (a warm start that
already reads the trunk's representation), the projection is drawn from N(0, initializer_range²)
and the norms start at one. Only safetensors weights are read for the MTP layers.
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
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

logger = logging.getLogger(__name__)

MTP_PREFIX = "model.mtp_layers."
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def mtp_state_dict(model) -> dict[str, torch.Tensor]:
    """MTP weights keyed by MiMo names (`block.` dropped)."""
    out = {}
    for key, value in model.mtp_layers.state_dict().items():
        idx, rest = key.split(".", 1)
        rest = rest[len("block."):] if rest.startswith("block.") else rest
        out[f"{MTP_PREFIX}{idx}.{rest}"] = value.detach().contiguous().cpu()
    return out


def _to_module_key(mimo_key: str, block_keys: set[str]) -> str:
    """`model.mtp_layers.0.self_attn.q_proj.weight` -> `0.block.self_attn.q_proj.weight`."""
    idx, rest = mimo_key[len(MTP_PREFIX):].split(".", 1)
    return f"{idx}.block.{rest}" if rest in block_keys else f"{idx}.{rest}"


def save_mtp_checkpoint(model, directory: str | Path, tokenizer=None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.num_nextn_predict_layers = model.num_mtp
    with quiet_transformers():
        model.base.save_pretrained(directory, safe_serialization=True)
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
        tokenizer.save_pretrained(directory)
    return directory


def _read_mtp_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.startswith(MTP_PREFIX):
                    tensors[key] = f.get_tensor(key)
    return tensors


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


def load_mtp_checkpoint(cls, path: str | Path, num_mtp_layers: int | None = None, dtype=None):
    path = Path(path)
    check_checkpoint_dir(path)
    stored = _read_mtp_tensors(path)
    stored_layers = sorted({int(m.group(1)) for k in stored if (m := re.match(r"model\.mtp_layers\.(\d+)\.", k))})
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with quiet_transformers():  # its load report would list every MTP key as "unexpected"
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    want = num_mtp_layers or getattr(base.config, "num_nextn_predict_layers", None) or max(len(stored_layers), 1)
    model = cls(base, int(want))
    block_keys = set(model.mtp_layers[0].block.state_dict())
    own = model.mtp_layers.state_dict()
    loaded = {}
    for key, tensor in stored.items():
        mkey = _to_module_key(key, block_keys)
        if int(mkey.split(".", 1)[0]) >= model.num_mtp:
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
            missing = sorted(need - have)[:3]
            raise ValueError(f"MTP layer {k} in '{path}' is incomplete (missing e.g. {missing}); "
                             "re-save the checkpoint or drop its MTP weights to start fresh")
        init_fresh_mtp_layer(model, k)
        logger.warning("MTP layer %d not found in '%s': initialised fresh (block copied from the trunk's last "
                       "layer, projection ~ N(0, %.3g^2), norms = 1)", k, path,
                       getattr(model.config, "initializer_range", 0.02))
    model.mtp_layers.load_state_dict({**own, **loaded})
    return model


@torch.no_grad()
def init_fresh_mtp_layer(model, k: int) -> None:
    """Fresh MTP layer k: block copied from the trunk's last decoder layer, N(0, σ²) projection, unit norms."""
    layer = model.mtp_layers[k]
    layer.block.load_state_dict(model.base.get_decoder().layers[-1].state_dict())
    layer.input_proj.weight.normal_(0.0, getattr(model.config, "initializer_range", 0.02))
    for norm in (layer.hidden_layernorm, layer.token_layernorm, layer.final_layernorm):
        norm.weight.fill_(1.0)


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
