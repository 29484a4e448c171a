"""Atomic training checkpoints: `run_dir/checkpoints/step-XXXXXXXX/`, complete only with `COMPLETE`.

Layout of one checkpoint:
    model/               the model + MTP layers (+ tokenizer) in Hugging Face layout, safetensors
    optimizer.pt         AdamW state, read back with `torch.load(weights_only=True)` (no free pickle)
    trainer_state.json   step, data position, elapsed time, scheduler state, world size, config
    rng-rank{r}.json     python / torch / CUDA RNG states of worker r (rank 0's on another process count)
    MANIFEST.json        every other file's relative path, size and SHA-256, written after them
    COMPLETE             written last
A sharded run (`parallel: fsdp`) writes instead of `optimizer.pt` and the model weights:
    dcp/                 model and AdamW state through torch.distributed.checkpoint, every rank
                         writing its own shards (resumable on any number of processes: DCP reshards;
                         the trainer allows it for runs started with rollout_rng: prompt, `resume_world_problem`)
    model/               the Hugging Face-layout export, streamed from the shards (`mtprl.train.export`)
Such a checkpoint resumes under either `parallel` setting: the model is built from the run's base
and the DCP state loaded into it, sharded or whole.

Writing: everything goes to a hidden `.tmp-step-XXXXXXXX/` directory, the manifest records it,
every file is fsync'd, the directory is renamed to its final name, and only then `COMPLETE` is
written (and fsync'd). A crash at any point leaves either no directory under the final name or
one without `COMPLETE`; such directories (and stale temporary ones) are ignored when looking for
the latest checkpoint.

Reading: `verify_checkpoint` checks a checkpoint against its manifest (every file present, with
its size and hash) before anything is loaded from it, so a file damaged after the save (a
truncated `model.safetensors`, a deleted `optimizer.pt`) is named instead of surfacing as a raw
loader error; `resumable_checkpoint` picks the newest checkpoint that verifies and says which
newer ones it skipped and why. Checkpoints written before manifests existed are checked for
their required files only.

Hook for other writers (sharded checkpoints): the manifest lists whatever files sit under the
temporary directory when rank 0 calls `write_manifest(tmp)`, after the barrier that follows every
rank's writes; a sharded save (e.g. torch.distributed.checkpoint files written by each rank into
`tmp`) is covered and verified without further changes, as long as it writes there before that
barrier.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from mtprl.config import ConfigError
from mtprl.train.distributed import Dist

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
_NAME = re.compile(r"^step-(\d{8})$")
# Files a checkpoint must hold whatever else it holds (checked for checkpoints without a manifest).
_REQUIRED = ("trainer_state.json", "optimizer.pt", "rng-rank0.json", "model/config.json")


class CheckpointError(ConfigError):
    """A checkpoint is incomplete or damaged; the message names the file and what to resume from instead."""


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _hashes(root: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of each file, several at a time (hashlib releases the GIL: the disk is the limit)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda name: _sha256(root / name), names)))


def write_manifest(directory: Path) -> dict[str, Any]:
    """Record every file under `directory` (but the manifest and marker) with its size and SHA-256."""
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.is_file() and p.name not in (MANIFEST, MARKER))
    hashes = _hashes(directory, names)
    manifest = {"format": 1, "files": {n: {"size": (directory / n).stat().st_size, "sha256": hashes[n]}
                                       for n in names}}
    _write_json(directory / MANIFEST, manifest)
    return manifest


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with checkpoint `path` (the first damaged or missing file), or None when it verifies."""
    if not (path / MARKER).is_file():
        return f"it is incomplete (no {MARKER} marker: it was being written when the run stopped)"
    if not (path / MANIFEST).is_file():  # written before manifests existed: the required files at least
        missing = [name for name in _REQUIRED if not (path / name).is_file()]
        return f"'{missing[0]}' is missing" if missing else None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            return f"'{name}' is missing"
        size = file.stat().st_size
        if size != info["size"]:
            return f"'{name}' has {size:,} bytes where {info['size']:,} were written (truncated or replaced)"
    for name, digest in _hashes(path, list(files)).items():
        if digest != files[name]["sha256"]:
            return f"'{name}' does not match the hash recorded when it was written (the file is damaged)"
    return None


def _resume_hint(candidates: list[tuple[int, Path]], bad: Path) -> str:
    good = [p for _, p in reversed(candidates) if p != bad and checkpoint_problem(p) is None]
    if good:
        return f"resume from the previous complete one with `--resume {good[0]}`"
    return "no other complete checkpoint verifies; start over with --overwrite or use another --output-dir"


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError naming the damaged file (and the `--resume` to use instead) unless `path` verifies."""
    problem = checkpoint_problem(path)
    if problem is not None:
        hint = _resume_hint(complete_checkpoints(path.parent), path)
        raise CheckpointError(f"checkpoint '{path}' cannot be resumed: {problem}; {hint}")


def resumable_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """(newest checkpoint under `root` that verifies, warnings naming each newer one skipped and why).

    (None, []) when there is no complete checkpoint at all; CheckpointError when there are some but
    none verifies.
    """
    found = complete_checkpoints(root)
    skipped = []
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, [f"checkpoint '{p}' is damaged ({why}); resuming from '{path.name}' instead"
                          for p, why in skipped]
        skipped.append((path, problem))
    if skipped:
        raise CheckpointError("no checkpoint under '{}' can be resumed: {}; start over with --overwrite or use another "
                              "--output-dir".format(root, "; ".join(f"{p.name}: {why}" for p, why in skipped)))
    return None, []


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether checkpoint `path` holds torch.distributed.checkpoint shards (a `parallel: fsdp` run's)."""
    return (path / "dcp").is_dir()


def _save_sharded(directory: Path, model, optimizer) -> None:
    """Model and optimiser state through DCP, each rank writing its shards (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded_state(path: Path, model, optimizer) -> None:
    """Load a sharded checkpoint's model and optimiser state into `model` (sharded or whole) and `optimizer`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save_checkpoint(root: Path, step: int, *, model, tokenizer, optimizer, scheduler, state: dict[str, Any],
                    dist: Dist, keep: int = 0, export_dtype: torch.dtype | None = None) -> Path | None:
    """Write checkpoint `step` atomically (collective: every worker calls it); returns its path on rank 0.

    `state` holds the JSON-serialisable trainer state (step, data position, config, ...). `keep` > 0
    removes all but the newest `keep` complete checkpoints afterwards. Under `dist.parallel == "fsdp"`
    the checkpoint is sharded (module docstring); `export_dtype` is the dtype of its HF export.
    """
    tmp, final = root / f".tmp-{checkpoint_name(step)}", root / checkpoint_name(step)
    sharded = getattr(dist, "parallel", "ddp") == "fsdp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    _write_json(tmp / f"rng-rank{dist.rank}.json", rng_state())
    if sharded:
        from mtprl.train.export import export_hf

        _save_sharded(tmp / "dcp", model, optimizer)
        export_hf(model, tmp / "model", tokenizer=tokenizer, dtype=export_dtype, is_main=dist.is_main)
    dist.barrier()
    if dist.is_main:
        if not sharded:
            model.save_pretrained(tmp / "model", tokenizer=tokenizer)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        full_state = {**state, "scheduler": scheduler.state_dict(), "world_size": dist.world}
        _write_json(tmp / "trainer_state.json", full_state)
        write_manifest(tmp)  # every file now under tmp, from every rank (the barrier above): see the docstring
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


def resume_world_problem(path: Path, world: int, rollout_rng: str) -> str | None:
    """Why checkpoint `path` cannot resume on `world` processes under `rollout_rng` without changing the run's
    results, or None. Under `batch` each worker samples its share of the prompts from a generator of its own
    (`mtprl.train.rollouts`), so another process count draws other responses; `prompt` resumes anywhere."""
    recorded = int(json.loads((path / "trainer_state.json").read_text()).get("world_size", 1))
    if recorded == world or rollout_rng == "prompt":
        return None
    return (f"checkpoint '{path}' was written by {recorded} process(es) and this launch has {world}; the run samples "
            f"with rollout_rng: batch (one generator per worker), so on {world} process(es) it would draw other "
            f"responses than the uninterrupted run. Resume it on {recorded} process(es), or start the run with "
            "rollout_rng: prompt (one generator per prompt group), which resumes on any number of processes")


def load_trainer_state(path: Path, optimizer, scheduler, dist: Dist, model=None) -> dict[str, Any]:
    """Restore optimizer, scheduler and this worker's RNG states from checkpoint `path`; return the state.

    The model weights are read separately (`MTPCausalLM.from_pretrained(path / "model")`), except from
    a sharded checkpoint, whose model state is loaded here into `model`; call `verify_checkpoint(path)`
    before either.
    """
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint '{path}' is incomplete (no {MARKER} marker): it was being written "
                              "when the run stopped; resume from an earlier one or with resume: auto")
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size", 1) != dist.world:
        rank_file = path / "rng-rank0.json"
    else:
        rank_file = path / f"rng-rank{dist.rank}.json"
    if is_sharded_checkpoint(path):
        load_sharded_state(path, model, optimizer)
    elif getattr(dist, "parallel", "ddp") == "fsdp":
        raise CheckpointError(f"checkpoint '{path}' was written by a data-parallel run (one optimizer.pt), which a "
                              "sharded run cannot load; resume it with parallel: ddp")
    else:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=dist.device, weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(json.loads(rank_file.read_text()))
    return state
