"""The Hugging Face-layout export of a (possibly FSDP-sharded) `MTPCausalLM`, streamed one unit at a time.

Writes what `MTPCausalLM.save_pretrained` writes — config.json (with `num_nextn_predict_layers` and
`mtp_layout`), generation_config.json, the tokenizer, the trunk's tensors under the base model's
own names and the MTP layers under the names of the model's MTP layout (`model.mtp_layers.N.*` for
MiMo; `mtprl.model.layout`) — as a sharded safetensors checkpoint with an index: one file per
trunk decoder layer, one per MTP layer, one for the rest (embedding, head, final norm). The tensors
come from `mtprl.train.fsdp.iter_full_state`, all-gathered one parameter at a time on every rank;
rank 0 holds at most one file's tensors before writing them, so the whole model is never gathered
in one process. Equal tensor for tensor to `save_pretrained` of the same weights (a test checks).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from mtprl.model.checkpoint import _Names, quiet_transformers
from mtprl.train.fsdp import iter_full_state

_LAYER = re.compile(r"^base\.model\.layers\.(\d+)\.")
_MTP = re.compile(r"^mtp_layers\.(\d+)\.")


def _unit(name: str) -> str:
    """Which file a tensor of the model (by its own name) goes to."""
    if match := _LAYER.match(name):
        return f"layer-{int(match.group(1))}"
    if match := _MTP.match(name):
        return f"mtp-{int(match.group(1))}"
    return "rest"


def export_names(model) -> dict[str, str]:
    """Our tensor name -> its name in the exported checkpoint (every tensor `iter_full_state` yields)."""
    names = _Names(model.layout.naming, model.config.num_hidden_layers)
    out = {}
    for name, _ in _named_tensors(model):
        if name.startswith("base."):
            out[name] = name[len("base."):]
        elif name.startswith("mtp_layers."):
            out[name] = names.stored(name[len("mtp_layers."):])
    return out


def _named_tensors(model):
    persistent = set(model.state_dict().keys())
    yield from model.named_parameters()
    yield from ((n, b) for n, b in model.named_buffers() if n in persistent)


def _write_config(model, directory: Path, tokenizer) -> None:
    model.config.num_nextn_predict_layers = model.num_mtp
    model.config.mtp_layout = model.layout.to_dict()
    with quiet_transformers():
        model.config.save_pretrained(directory)
        generation = getattr(model.base, "generation_config", None)
        if generation is not None and model.base.can_generate():
            generation.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def export_hf(model, directory: str | Path, *, tokenizer=None, dtype: torch.dtype | None = None,
              is_main: bool = True) -> Path | None:
    """Stream `model` to `directory` in HF layout (collective when sharded: every rank calls it).

    `dtype`: the dtype the tensors are written in (default: as held). Only rank 0 (`is_main`) writes.
    """
    directory = Path(directory)
    stored = export_names(model)
    run_of, runs = {}, []  # consecutive tensors of one unit form one file
    for name in stored:
        if not runs or runs[-1] != _unit(name):
            runs.append(_unit(name))
        run_of[name] = len(runs) - 1
    files = [f"model-{i + 1:05d}-of-{len(runs):05d}.safetensors" for i in range(len(runs))]
    head_weight = model.base.get_output_embeddings().weight
    head_name = next(n for n, p in model.named_parameters() if p is head_weight)
    copies_head = model.layout.naming == "deepseek"  # DeepSeek-V3 stores the shared head in every MTP layer
    names = _Names(model.layout.naming, model.config.num_hidden_layers)
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        _write_config(model, directory, tokenizer)
    weight_map, total, pending, current, head = {}, 0, {}, None, None

    def flush():
        nonlocal total
        if is_main and pending:
            save_file(pending, directory / files[current], metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in pending.values())
        pending.clear()

    for name, tensor in iter_full_state(model):
        if name not in stored:
            continue
        if run_of[name] != current:
            flush()
            current = run_of[name]
        if not is_main:
            continue
        tensor = tensor.detach().to(dtype or tensor.dtype).contiguous().cpu()
        pending[stored[name]] = tensor
        weight_map[stored[name]] = files[current]
        if name == head_name and copies_head:
            head = tensor
        if copies_head and runs[current].startswith("mtp-"):
            key = names.part_prefix(int(runs[current][4:])) + "shared_head.head.weight"
            if key not in pending:
                pending[key] = head.clone()
                weight_map[key] = files[current]
    flush()
    if not is_main:
        return None
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory
