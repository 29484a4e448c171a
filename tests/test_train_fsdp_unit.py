"""`parallel: fsdp` in one process: refusals, the sharded helpers against torch's, the streamed export,
and a 1-process sharded run equal to the unsharded one (the 2-process tests: test_train_fsdp.py)."""

import types

import pytest
import torch

from mtprl.config import ConfigError
from mtprl.model import MTPCausalLM, build_tiny_model, build_tokenizer
from mtprl.train.config import TrainConfig
from mtprl.train.distributed import Dist
from mtprl.train.export import export_hf
from mtprl.train.fsdp import check_sharded_run, clip_grad_norm_, gathered, iter_full_state
from mtprl.train.metrics import read_metrics

from conftest import small_train_config

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)


def test_occ_exact_is_refused_sharded():
    with pytest.raises(ConfigError, match="use parallel: ddp"):
        TrainConfig(regime="occ-exact", parallel="fsdp").validate()
    TrainConfig(regime="occ-exact", parallel="ddp").validate()


def test_sharded_run_needs_equal_shares_and_float32_on_cpu():
    cfg = TrainConfig(prompts_per_step=3, group_size=2, mini_batches=2, parallel="fsdp")  # 3 rows per mini-batch
    assert "must divide by the 2 workers" in check_sharded_run(cfg, 2, torch.device("cpu"))
    assert check_sharded_run(cfg, 3, torch.device("cpu")) is None
    bf16 = TrainConfig(dtype="bfloat16", parallel="fsdp")
    assert "use dtype: float32" in check_sharded_run(bf16, 1, torch.device("cpu"))
    assert check_sharded_run(bf16, 1, torch.device("cuda")) is None


def _accelerator(kind: str, plugin=None):
    return types.SimpleNamespace(distributed_type=kind, process_index=0, num_processes=1,
                                 device=torch.device("cpu"), state=types.SimpleNamespace(fsdp_plugin=plugin))


def test_accelerate_configs():
    with pytest.raises(RuntimeError, match="--parallel fsdp"):
        Dist(_accelerator("DistributedType.DEEPSPEED"))
    assert Dist(_accelerator("DistributedType.FSDP", types.SimpleNamespace(fsdp_version=2))).parallel == "fsdp"
    assert Dist(_accelerator("DistributedType.MULTI_CPU")).parallel == "ddp"
    offload = types.SimpleNamespace(fsdp_version=2, cpu_offload=types.SimpleNamespace(offload_params=True))
    with pytest.raises(RuntimeError, match="CPU offload"):
        Dist(_accelerator("DistributedType.FSDP", offload))
    with pytest.raises(RuntimeError, match="reshard_after_forward"):
        Dist(_accelerator("DistributedType.FSDP", types.SimpleNamespace(fsdp_version=2, reshard_after_forward=False)))


@pytest.mark.parametrize("max_norm", [0.01, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=g)
        b.grad = a.grad.clone()
    norm = clip_grad_norm_(ours, max_norm)
    expected = float(torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    assert abs(norm - expected) < 1e-6 * expected
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad, b.grad, atol=1e-7, rtol=0)


def test_unsharded_helpers_are_plain():
    model = build_tiny_model(build_tokenizer(), num_mtp_layers=1, **SMALL)
    with gathered(model) as same:
        assert same is model
    names = [n for n, _ in iter_full_state(model)]
    assert names[0] == "base.model.embed_tokens.weight" and "base.lm_head.weight" not in names  # tied: once
    assert names == [n for n, _ in model.named_parameters()]


def test_streamed_export_equals_save_pretrained(tmp_path):
    from safetensors import safe_open

    tok = build_tokenizer()
    model = build_tiny_model(tok, num_mtp_layers=2, seed=3, **SMALL)
    model.save_pretrained(tmp_path / "whole", tokenizer=tok)
    export_hf(model, tmp_path / "streamed", tokenizer=tok)

    def tensors(directory):
        out = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(file, framework="pt") as handle:
                out.update({k: handle.get_tensor(k) for k in handle.keys()})
        return out

    whole, streamed = tensors(tmp_path / "whole"), tensors(tmp_path / "streamed")
    assert whole.keys() == streamed.keys()
    assert all(torch.equal(whole[k], streamed[k]) for k in whole)
    assert any(k.startswith("model.mtp_layers.1.") for k in streamed)
    back = MTPCausalLM.from_pretrained(tmp_path / "streamed")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_one_process_sharded_run_equals_unsharded(tmp_path, tiny_checkpoint):
    """A 1-process `parallel: fsdp` run (its own one-rank gloo group, DCP checkpoint) trains as `ddp` does,
    with a sharded reference model (KL loss), speculative rollouts from the gathered model, and the same
    exact and held-out diagnostics."""
    import torch.distributed as torch_dist

    from mtprl.train import train

    timing = ("time", "time/rollout_s", "time/update_s", "rollout/tokens_per_s")
    runs = {}
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        train(small_train_config(tiny_checkpoint, out, parallel=parallel, exact_every=1, kl_coef=0.05,
                                 draft_tokens=1))
        runs[parallel] = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(out / "metrics.jsonl")]
    assert not torch_dist.is_initialized()  # the run's own one-rank group is gone
    for a, b in zip(runs["ddp"], runs["fsdp"], strict=True):
        assert a["kind"] == "eval" or any(k.startswith("heldout/0/lambda_star") for k in b)  # measured sharded too
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], str):
                assert a[key] == b[key], key
            else:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key)
    sharded = tmp_path / "fsdp" / "checkpoints" / "step-00000002"
    assert (sharded / "dcp" / ".metadata").is_file() and not (sharded / "optimizer.pt").exists()
    one = MTPCausalLM.from_pretrained(tmp_path / "ddp" / "checkpoints" / "step-00000002" / "model")
    two = MTPCausalLM.from_pretrained(sharded / "model")
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), name


def test_a_crash_inside_the_sharded_write_leaves_no_complete_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    """A DCP save that dies half-way leaves a hidden temporary directory, never a step-N that looks complete."""
    import mtprl.train.checkpoint as checkpoint
    from mtprl.train import train

    def dies(directory, model, optimizer):
        directory.mkdir(parents=True)
        (directory / "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt("killed while writing shards")

    monkeypatch.setattr(checkpoint, "_save_sharded", dies)
    with pytest.raises(KeyboardInterrupt):
        train(small_train_config(tiny_checkpoint, tmp_path / "run", parallel="fsdp", exact_every=0, steps=1))
    root = tmp_path / "run" / "checkpoints"
    assert checkpoint.complete_checkpoints(root) == [] and checkpoint.latest_checkpoint(root) is None
    assert [p.name for p in root.iterdir()] == [".tmp-step-00000001"]


def test_a_sharded_checkpoint_resumes_unsharded(tmp_path, tiny_checkpoint):
    """A `parallel: fsdp` checkpoint (DCP) resumes under `parallel: ddp` (the model built from the base, the
    DCP state loaded into it) and the run goes on as the uninterrupted sharded one; the reverse is refused."""
    import shutil

    from mtprl.train import train
    from mtprl.train.checkpoint import CheckpointError

    timing = ("time", "time/rollout_s", "time/update_s", "rollout/tokens_per_s")

    def records(run):
        return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run / "metrics.jsonl")]

    whole = tmp_path / "whole"
    train(small_train_config(tiny_checkpoint, whole, parallel="fsdp", exact_every=0, save_every=1))
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    step1 = resumed / "checkpoints" / "step-00000001"
    train(small_train_config(tiny_checkpoint, resumed, parallel="ddp", exact_every=0, save_every=1, resume=str(step1)))
    for a, b in zip(records(whole), records(resumed), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == b[key] or abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key)
    assert (resumed / "checkpoints" / "step-00000002" / "optimizer.pt").is_file()  # ddp writes its own format
    with pytest.raises(CheckpointError, match="resume it with parallel: ddp"):
        train(small_train_config(tiny_checkpoint, resumed, parallel="fsdp", exact_every=0,
                                 resume=str(resumed / "checkpoints" / "step-00000002")))
