"""Atomic checkpoints: the COMPLETE marker, crash mid-write, restoring optimizer / scheduler / RNG, no free pickle,
the manifest (sizes and hashes) and the choice of a checkpoint that verifies."""

import pickle
import random

import pytest
import torch

from mtprl.model import apply_regime, build_tiny_model, build_tokenizer
from mtprl.train.checkpoint import (
    MANIFEST, MARKER, CheckpointError, checkpoint_problem, latest_checkpoint, load_trainer_state, resumable_checkpoint,
    save_checkpoint, verify_checkpoint,
)
from mtprl.train.config import TrainConfig
from mtprl.train.distributed import Dist
from mtprl.train.update import build_optimizer


@pytest.fixture()
def parts():
    tok = build_tokenizer()
    model = build_tiny_model(tok, num_mtp_layers=1, seed=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    apply_regime(model, "occ")
    optimizer, scheduler = build_optimizer(model, TrainConfig(lr=1e-3, warmup_steps=3))
    for p in model.parameters():  # one real AdamW step so that the optimizer has state
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    return model, tok, optimizer, scheduler


def save(root, step, parts, **kw):
    model, tok, optimizer, scheduler = parts
    return save_checkpoint(root, step, model=model, tokenizer=tok, optimizer=optimizer, scheduler=scheduler,
                           state={"step": step, "data_position": 10 * step}, dist=Dist(), **kw)


def test_latest_is_the_newest_complete_one(tmp_path, parts):
    root = tmp_path / "checkpoints"
    save(root, 1, parts)
    path = save(root, 2, parts)
    assert path.name == "step-00000002" and (path / MARKER).is_file()
    assert (path / "model" / "model.safetensors").is_file() and (path / "rng-rank0.json").is_file()
    # A crash after the rename but before the marker, and a crash mid-write in the temporary directory:
    (root / "step-00000003").mkdir()
    (root / ".tmp-step-00000004").mkdir()
    assert latest_checkpoint(root) == path
    with pytest.raises(CheckpointError, match="incomplete"):
        load_trainer_state(root / "step-00000003", parts[2], parts[3], Dist())


def test_crash_while_writing_leaves_no_complete_checkpoint(tmp_path, parts, monkeypatch):
    root = tmp_path / "checkpoints"
    first = save(root, 1, parts)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save(root, 2, parts)
    assert latest_checkpoint(root) == first
    assert not (root / "step-00000002").exists()


def test_keep_prunes_old_checkpoints(tmp_path, parts):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save(root, step, parts, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]


def test_restores_optimizer_scheduler_and_rng(tmp_path, parts):
    model, tok, optimizer, scheduler = parts
    torch.manual_seed(123)
    random.seed(7)
    path = save(tmp_path, 5, parts)
    after_save = (torch.rand(3), random.random())

    fresh_opt, fresh_sched = build_optimizer(model, TrainConfig(lr=1e-3, warmup_steps=3))
    torch.manual_seed(0)
    state = load_trainer_state(path, fresh_opt, fresh_sched, Dist())
    assert state["step"] == 5 and state["data_position"] == 50
    assert (torch.rand(3).tolist(), random.random()) == (after_save[0].tolist(), after_save[1])
    # Warm-up of 3 updates, one done: lr = 1e-3 · (1 + 1) / (3 + 1).
    assert fresh_sched.get_last_lr()[0] == pytest.approx(5e-4)
    for group_a, group_b in zip(optimizer.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values()):
        assert torch.equal(group_a["exp_avg_sq"], group_b["exp_avg_sq"])


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_optimizer_file_is_not_unpickled_freely(tmp_path, parts, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = save(tmp_path / "checkpoints", 1, parts)
    (path / "optimizer.pt").write_bytes(pickle.dumps({"state": _Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        load_trainer_state(path, parts[2], parts[3], Dist())
    assert not (tmp_path / "PWNED").exists()


def test_manifest_records_every_file_with_size_and_hash(tmp_path, parts):
    import hashlib
    import json

    path = save(tmp_path, 1, parts)
    files = json.loads((path / MANIFEST).read_text())["files"]
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                     if p.is_file() and p.name not in (MANIFEST, MARKER))
    assert sorted(files) == on_disk and "model/model.safetensors" in files and "optimizer.pt" in files
    for name, info in files.items():
        data = (path / name).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert checkpoint_problem(path) is None


def test_damage_is_named_and_the_newest_good_checkpoint_chosen(tmp_path, parts):
    root = tmp_path / "checkpoints"
    first, second, third = (save(root, step, parts) for step in (1, 2, 3))
    weights = third / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the hash sees it
    weights.write_bytes(bytes(data))
    (second / "optimizer.pt").unlink()
    assert "'model/model.safetensors' does not match the hash" in checkpoint_problem(third)
    assert checkpoint_problem(second) == "'optimizer.pt' is missing"
    chosen, warnings = resumable_checkpoint(root)
    assert chosen == first and len(warnings) == 2
    assert "step-00000003' is damaged ('model/model.safetensors' does not match" in warnings[0]
    assert "resuming from 'step-00000001' instead" in warnings[1]
    with pytest.raises(CheckpointError, match=rf"'optimizer.pt' is missing; resume from the previous complete one "
                                              rf"with `--resume {first}`"):
        verify_checkpoint(second)
    (first / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint under .* can be resumed: step-00000003: .*; "
                                              "step-00000002: .*; step-00000001: 'trainer_state.json' is missing"):
        resumable_checkpoint(root)


def test_checkpoint_without_manifest_is_checked_for_its_required_files(tmp_path, parts):
    path = save(tmp_path, 1, parts)
    (path / MANIFEST).unlink()  # as written before manifests existed
    assert checkpoint_problem(path) is None
    (path / "rng-rank0.json").unlink()
    assert checkpoint_problem(path) == "'rng-rank0.json' is missing"
