"""Atomic training checkpoints: `run_dir/checkpoints/step-XXXXXXXX/`, complete only with `COMPLETE`.

Layout of one checkpoint:
    model/               the model + MTP layers (+ tokenizer) in Hugging Face layout, safetensors
    optimizer.pt         AdamW state, read back with `torch.load(weights_only=True)` (no free pickle)
    trainer_state.json   step, data position, elapsed time, scheduler state, world size, config
    rng-rank{r}.json     python / torch / CUDA RNG states of worker r
    COMPLETE             written last
Writing: everything goes to a hidden `.tmp-step-XXXXXXXX/` directory, every file is fsync'd, the
directory is renamed to its final name, and only then `COMPLETE` is written (and fsync'd). A crash
at any point leaves either no directory under the final name or one without `COMPLETE`; such
directories (and stale temporary ones) are ignored when looking for the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from mtprl.train.distributed import Dist

MARKER = "COMPLETE"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            _fsync_file(path)
        else:
            _fsync_dir(path)
    _fsync_dir(root)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))


def rng_state() -> dict[str, Any]:
    """The python, torch and (if present) CUDA RNG states as JSON-serialisable data."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under `root`, or None."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: Path, step: int, *, model, tokenizer, optimizer, scheduler, state: dict[str, Any],
                    dist: Dist, keep: int = 0) -> Path | None:
    """Write checkpoint `step` atomically (collective: every worker calls it); returns its path on rank 0.

    `state` holds the JSON-serialisable trainer state (step, data position, config, ...). `keep` > 0
    removes all but the newest `keep` complete checkpoints afterwards.
    """
    tmp, final = root / f".tmp-{checkpoint_name(step)}", root / checkpoint_name(step)
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    _write_json(tmp / f"rng-rank{dist.rank}.json", rng_state())
    dist.barrier()
    if dist.is_main:
        model.save_pretrained(tmp / "model", tokenizer=tokenizer)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        full_state = {**state, "scheduler": scheduler.state_dict(), "world_size": dist.world}
        _write_json(tmp / "trainer_state.json", full_state)
        _fsync_tree(tmp)
        if final.exists():  # a checkpoint of this step from before a resume to an earlier one
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        (final / MARKER).write_text(f"{step}\n")
        _fsync_file(final / MARKER)
        _fsync_dir(final)
        if keep > 0:
            for _, old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final if dist.is_main else None


def load_trainer_state(path: Path, optimizer, scheduler, dist: Dist) -> dict[str, Any]:
    """Restore optimizer, scheduler and this worker's RNG states from checkpoint `path`; return the state.

    The model weights are read separately (`MTPCausalLM.from_pretrained(path / "model")`).
    """
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"checkpoint '{path}' is incomplete (no {MARKER} marker): it was being written "
                                "when the run stopped; resume from an earlier one or with resume: auto")
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size", 1) != dist.world:
        rank_file = path / "rng-rank0.json"
    else:
        rank_file = path / f"rng-rank{dist.rank}.json"
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=dist.device, weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(json.loads(rank_file.read_text()))
    return state
