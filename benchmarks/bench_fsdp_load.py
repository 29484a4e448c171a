"""Per-rank peak host memory of loading a checkpoint for FSDP2: rank 0 only (what `mtprl train` does) vs every rank.

    python benchmarks/bench_fsdp_load.py [--hidden 1024 --layers 12]

Writes a randomly initialised Qwen2-shaped checkpoint (hidden 1024, 12 layers, 1 MTP layer: ~159 M
parameters, ~0.6 GB in float32) to a temporary directory, then launches 2 CPU processes (gloo, one
torch thread each) twice under `torchrun`, once per way of loading, each ending with the model sharded:
- `rank0`: `mtprl.train.loop.load_for_sharding` (rank 0 reads the checkpoint, rank 1 builds the model on
  the meta device) and `shard_model(..., full_state=...)` (rank 1's shards broadcast from rank 0);
- `every`: every rank reads the whole checkpoint (`load_model`) and shards it (the trainer before).
Printed per rank: the process's peak RSS (`ru_maxrss`, everything included: Python, torch, gloo) once
the model is sharded. Expected: rank 1 lower by about the checkpoint's size with `rank0`, rank 0 the
same. A whole run's peak comes later (rollouts gather the whole model on every rank), not from loading.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _worker(checkpoint: Path, mode: str, out: Path) -> None:
    import torch
    import torch.distributed as torch_dist

    from mtprl.train.config import TrainConfig
    from mtprl.train.distributed import Dist
    from mtprl.train.fsdp import shard_model
    from mtprl.train.loop import load_for_sharding, load_model

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo")
    dist = Dist()
    dist.rank, dist.world, dist.parallel = torch_dist.get_rank(), torch_dist.get_world_size(), "fsdp"
    cfg = TrainConfig(model=str(checkpoint), parallel="fsdp")
    if mode == "rank0":
        model, _, full_state = load_for_sharding(checkpoint, cfg, dist)
        shard_model(model, torch.device("cpu"), bf16_compute=False, full_state=full_state)
        del full_state
    else:
        model = load_model(checkpoint, cfg, torch.device("cpu"))[0]
        shard_model(model, torch.device("cpu"), bf16_compute=False)
    torch_dist.barrier()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (out / f"{mode}-rank{dist.rank}.json").write_text(json.dumps({"rss": rss}))
    torch_dist.destroy_process_group()



def main() -> None:
    from mtprl.train.distributed import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(Path(args.worker[0]), args.worker[1], Path(args.worker[2]))
    import torch

    from mtprl.model import build_tiny_model, build_tokenizer

    out = Path(tempfile.mkdtemp(prefix="bench-fsdp-load-"))
    tok = build_tokenizer()
    model = build_tiny_model(tok, num_mtp_layers=1, seed=0, hidden_size=args.hidden, num_layers=args.layers,
                             num_heads=8, num_kv_heads=2)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out / "model", tokenizer=tok)
    size = sum(f.stat().st_size for f in (out / "model").glob("*.safetensors"))
    del model
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for mode in ("rank0", "every"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), __file__, "--worker", str(out / "model"), mode, str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the {mode} run failed:\n{done.stderr[-3000:]}")
    mib = 1 / 2 ** 20
    print(f"checkpoint: {n_params / 1e6:.1f} M parameters, {size * mib:.0f} MiB of safetensors (float32); "
          f"2 processes, torch {torch.__version__}")
    print(f"{'loading':>22} {'rank 0 peak RSS MiB':>20} {'rank 1 peak RSS MiB':>20}")
    rss = {m: [json.loads((out / f"{m}-rank{r}.json").read_text())["rss"] * mib for r in (0, 1)]
           for m in ("rank0", "every")}
    for mode, label in (("rank0", "rank 0 only (mtprl)"), ("every", "every rank (before)")):
        print(f"{label:>22} {rss[mode][0]:>20.0f} {rss[mode][1]:>20.0f}")
    print(f"rank 1, rank 0 only / every rank: {rss['rank0'][1] / rss['every'][1]:.2f}")


if __name__ == "__main__":
    main()
