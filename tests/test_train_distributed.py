"""Data parallelism: 2 CPU processes (gloo, `accelerate launch`) take the same step as 1 process.

The test launches this file under `accelerate launch --multi_gpu --num_processes 2` (the torchrun
launcher; on a machine without GPUs, `Accelerator(cpu=True)` then joins a gloo group); each worker trains
its share of every mini-batch of one fixed global batch, and rank 0 saves the parameters. The
1-process run of the same global batch must agree within 1e-5. In the same launch the workers
then run `train()` for two steps (rollouts split across workers, checkpoint by rank 0) as a smoke test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtprl.model import apply_regime, build_tiny_model, build_tokenizer
from mtprl.train.batch import TrainBatch
from mtprl.train.config import TrainConfig
from mtprl.train.distributed import Dist, free_port, launch_mismatch, shutdown
from mtprl.train.update import build_optimizer, prepare_log_probs, train_on_batch

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


def global_batch(n: int = 16) -> TrainBatch:
    """A fixed batch: left-padded prompts of 3..6 tokens, right-padded responses of 2..10, random advantages."""
    g = torch.Generator().manual_seed(11)
    P, R = 6, 10
    prompt_len, resp_len = torch.randint(3, P + 1, (n,), generator=g), torch.randint(2, R + 1, (n,), generator=g)
    cols = torch.arange(P + R)
    attn = (cols >= P - prompt_len[:, None]) & (cols < P + resp_len[:, None])
    ids = torch.where(attn, torch.randint(3, 99, (n, P + R), generator=g), 0)
    return TrainBatch.build(ids, attn, attn[:, P:], torch.randn(n, generator=g), 1)


def update_config() -> TrainConfig:
    # 16 rows, 2 mini-batches of 8: each worker takes 4 rows per mini-batch as two micro-batches of 2,
    # the same row sets as one process's four micro-batches of 2 (so OCC's per-micro-batch ĉ agrees).
    return TrainConfig(regime="occ", prompts_per_step=4, group_size=4, mini_batches=2, micro_batch_size=2, epochs=2,
                       lr=1e-4, max_new_tokens=10, mtp_coef=0.5, eval_suites=["add-easy"])


def one_update(dist: Dist) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    cfg = update_config()
    model = build_tiny_model(build_tokenizer(), num_mtp_layers=1, seed=5, **SMALL).eval()
    apply_regime(model, cfg.regime)
    optimizer, scheduler = build_optimizer(model, cfg)
    batch = global_batch()
    prepare_log_probs(model, None, batch, cfg, step=1, dist=dist)
    metrics = train_on_batch(model, optimizer, scheduler, batch, cfg, step=1, dist=dist, exact=True)
    assert metrics["mtp/0/lambda_first"] == 0.0
    return {name: p.detach().clone() for name, p in model.named_parameters()}, metrics


def _worker(out: Path, tiny: Path) -> None:
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from mtprl.train import train

    accelerator = Accelerator(cpu=True)
    dist = Dist(accelerator)
    assert dist.world == 2
    # Gradient sums go in buckets (here of at most 5 elements) per dtype; ranks hold x + rank.
    parts = [torch.arange(3.0) + dist.rank, torch.full((4,), float(dist.rank)), torch.tensor([1, 2]) * (1 + dist.rank)]
    dist.sum_(parts, bucket_elements=5)
    assert [p.tolist() for p in parts] == [[1.0, 3.0, 5.0], [1.0] * 4, [3, 6]]
    params, metrics = one_update(dist)
    if dist.is_main:
        save_file(params, out / "params.safetensors")
        (out / "metrics.json").write_text(json.dumps(metrics))
    cfg = TrainConfig(model=str(tiny), regime="policy", steps=2, prompts_per_step=2, group_size=4, mini_batches=2,
                      micro_batch_size=2, max_new_tokens=12, overlong_buffer=11, max_draws=2, eval_every=0,
                      eval_at_start=False, eval_limit=2, eval_k=2, eval_suites=["add-easy"], exact_every=1,
                      output_dir=str(out / "run"), progress=False, device="cpu")
    train(cfg)
    shutdown()



@pytest.mark.slow
def test_two_processes_take_the_one_process_step(tmp_path):
    from safetensors.torch import load_file

    from mtprl.train.metrics import read_metrics

    tiny = tmp_path / "tiny"
    tok = build_tokenizer()
    build_tiny_model(tok, num_mtp_layers=1, seed=0, **SMALL).save_pretrained(tiny, tokenizer=tok)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), __file__, str(tmp_path), str(tiny)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 says how the run was launched, and nobody warns about a mismatch.
    assert "mtprl train: 2 processes (world size 2, process-group backend gloo), device cpu" in done.stderr
    assert "WARNING" not in done.stderr

    two = load_file(tmp_path / "params.safetensors")
    one, metrics = one_update(Dist())
    initial = build_tiny_model(tok, num_mtp_layers=1, seed=5, **SMALL).state_dict()
    assert max(float((one[k] - initial[k]).abs().max()) for k in one) > 1e-5  # the steps moved the parameters
    for name, value in one.items():
        assert torch.allclose(two[name], value, atol=1e-5, rtol=0), name
    dp_metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("pg/loss", "mtp/0/loss", "mtp/0/lambda", "grad_norm", "entropy"):
        assert abs(dp_metrics[key] - metrics[key]) <= 1e-5 * max(1.0, abs(metrics[key])), key
    # The held-out terms: half gradients summed over workers, the same inner products as one process.
    for key in ("heldout/0/dot", "heldout/0/same_dot", "heldout/0/pdot", "heldout/0/g_mtp_sq"):
        assert dp_metrics[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-9), key
    # The proxy's mean ratio divides two float32 sums that nearly cancel: rounding reaches 3e-4 of it
    # on some CPUs (0.0041845 vs 0.0041833 seen), while a wrong reduction would be off by a factor.
    assert dp_metrics["heldout/0/proxy_mean_ratio"] == pytest.approx(metrics["heldout/0/proxy_mean_ratio"],
                                                                      rel=2e-3, abs=1e-9)

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2)]
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "rng-rank1.json").is_file()


def test_launch_mismatch_names_the_cause():
    assert launch_mismatch(1, {}) is None
    assert launch_mismatch(2, {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}) is None
    assert "WORLD_SIZE=4 but this run has 2" in launch_mismatch(2, {"WORLD_SIZE": "4"})
    one = launch_mismatch(1, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert "only this one process runs" in one and "--multi_gpu --num_processes N" in one


@pytest.mark.slow
def test_cpu_launch_that_runs_one_process_says_so(tmp_path, tiny_checkpoint):
    """`accelerate launch --cpu --num_processes 2` starts one process; the run must say so, not just exit 0."""
    from conftest import small_train_config

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(vars(small_train_config(tiny_checkpoint, tmp_path / "run", steps=1,
                                                               exact_every=0))))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "mtprl", "train", "--config", str(cfg_file)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mtprl train: 1 process (world size 1" in done.stderr
    assert "WARNING: the environment is set up for a multi-process launch" in done.stderr
    assert "accelerate launch --multi_gpu --num_processes N" in done.stderr


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
