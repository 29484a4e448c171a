"""Per-rank memory of parameters + gradients + AdamW state, and step time, with 1 and 2 FSDP2 processes.

    python benchmarks/bench_fsdp.py [--hidden 512 --layers 8 --rows 16 --response 32 --repeats 3]

Launches itself twice under `torchrun` (CPU, gloo, one torch thread per process): 1 process
(unsharded: `parallel: fsdp` with one process shards nothing) and 2 processes (FSDP2). Each builds
the same randomly initialised Qwen2-shaped model (hidden 512, 8 layers, 1 MTP layer: ~30 M
parameters), takes one untimed update to create the AdamW state, then `--repeats` timed updates
(`mtprl.train.update.train_on_batch`: 2 mini-batches × micro-batches of 4 rows, regime occ) on one
fixed batch. Memory is counted, not sampled: the bytes of this rank's parameter shards, gradient
shards and AdamW moments just before an optimiser step, when all three are alive (activations,
the layers FSDP gathers for a forward, and the whole model gathered for rollouts are not in it;
`peak RSS` is the process's own high-water mark, everything included). Expected: about half per
rank with 2 processes. The step time of 2 processes on a machine with fewer free cores than
processes measures the machine, not FSDP: read the ratio with the core count printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _bytes(tensors) -> int:
    from mtprl.train.fsdp import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def _worker(args, out: Path) -> None:
    import torch.distributed as torch_dist

    from mtprl.model import MTPCausalLM, apply_regime, build_tokenizer
    from mtprl.model.tiny import tiny_config
    from mtprl.train.config import TrainConfig
    from mtprl.train.distributed import Dist
    from mtprl.train.fsdp import gathered, shard_model
    from mtprl.train.update import build_optimizer, prepare_log_probs, train_on_batch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_update import make_batch

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo")
    world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
    dist = Dist()
    dist.rank, dist.world, dist.parallel = rank, world, "fsdp"
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=4)
    model = MTPCausalLM(config, 1).eval()
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(regime="occ", prompts_per_step=args.rows // 4, group_size=4, mini_batches=2, micro_batch_size=4,
                      max_new_tokens=args.response, parallel="fsdp")
    apply_regime(model, cfg.regime)
    if world > 1:
        shard_model(model, torch.device("cpu"), bf16_compute=False)
    optimizer, scheduler = build_optimizer(model, cfg)
    batch = make_batch(args.rows, 16, args.response, 1, torch.device("cpu"))
    with gathered(model):
        prepare_log_probs(model, None, batch, cfg, step=1, dist=dist)
    seen = {}
    step = optimizer.step

    def measured_step(*a, **k):  # params, grads and AdamW moments all alive just here
        params = list(model.parameters())
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        seen.update(params=_bytes(params), grads=_bytes(p.grad for p in params), optim=_bytes(state))
        return step(*a, **k)

    optimizer.step = measured_step
    train_on_batch(model, optimizer, scheduler, batch, cfg, step=1, dist=dist)  # creates the AdamW state
    times = []
    for _ in range(args.repeats):
        torch_dist.barrier()
        t0 = time.perf_counter()
        train_on_batch(model, optimizer, scheduler, batch, cfg, step=1, dist=dist)
        torch_dist.barrier()
        times.append(time.perf_counter() - t0)
    record = {**seen, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "times": times,
              "n_params": n_params}
    (out / f"world{world}-rank{rank}.json").write_text(json.dumps(record))
    torch_dist.barrier()
    torch_dist.destroy_process_group()



def main() -> None:
    from mtprl.train.distributed import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args, Path(args.worker))
    out = Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    passed = [f"--{k}={v}" for k, v in vars(args).items() if k != "worker"]
    for world in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(free_port()), __file__, *passed, f"--worker={out}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the {world}-process run failed:\n{done.stderr[-3000:]}")
    mib = 1 / 2 ** 20
    rows = {w: [json.loads((out / f"world{w}-rank{r}.json").read_text()) for r in range(w)] for w in (1, 2)}
    print(f"model: {rows[1][0]['n_params'] / 1e6:.1f} M parameters (hidden {args.hidden}, {args.layers} layers, 1 MTP "
          f"layer), float32; {os.cpu_count()} CPU cores, 1 torch thread per process")
    print(f"{'processes':>9} {'rank':>4} {'params MiB':>10} {'grads MiB':>9} {'AdamW MiB':>9} {'sum MiB':>8} "
          f"{'peak RSS MiB':>12} {'step s (median)':>15}")
    for w, ranks in rows.items():
        for r, rec in enumerate(ranks):
            total = rec["params"] + rec["grads"] + rec["optim"]
            print(f"{w:>9} {r:>4} {rec['params'] * mib:>10.1f} {rec['grads'] * mib:>9.1f} {rec['optim'] * mib:>9.1f} "
                  f"{total * mib:>8.1f} {rec['rss'] * mib:>12.0f} {statistics.median(rec['times']):>15.3f}")
    one = rows[1][0]
    one_total = one["params"] + one["grads"] + one["optim"]
    worst = max(r["params"] + r["grads"] + r["optim"] for r in rows[2])
    t1, t2 = statistics.median(one["times"]), statistics.median(rows[2][0]["times"])
    print(f"per-rank params+grads+AdamW, 2 processes / 1 process: {worst / one_total:.3f} (largest rank)")
    print(f"step time, 2 processes / 1 process: {t2 / t1:.2f} (median of {args.repeats}; same global batch)")


if __name__ == "__main__":
    main()
