"""One RL step of a random ~0.5 B Qwen2-shaped model with one MTP layer under FSDP2: peak memory, tokens/s.

    python benchmarks/bench_fsdp_gpu.py                 # one GPU (a one-rank group), bfloat16 compute
    torchrun --nproc_per_node N benchmarks/bench_fsdp_gpu.py
    python benchmarks/bench_fsdp_gpu.py --small --device cpu   # the same code path, tiny, on CPU

The model is Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocabulary
151,936, tied embedding) plus one MTP layer, randomly initialised, sharded as `mtprl train
--parallel fsdp` shards it (float32 shards and AdamW state; bfloat16 forward on GPU). One step is the
trainer's own path: rollouts from the gathered model (`--prompts` random prompts × `--group`
samples, `--new-tokens` each), old log-probs, then `train_on_batch` (2 mini-batches, micro-batches
of `--micro`, regime occ) with random advantages. Printed per phase: wall time, tokens/s, and peak
device memory (torch.cuda.max_memory_allocated, reset before each phase; on CPU not measured).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny model of the same shape family (smoke test)")
    args = parser.parse_args()

    import torch.distributed as torch_dist
    from transformers import Qwen2Config

    from mtprl.model import MTPCausalLM, apply_regime
    from mtprl.rollout import SamplingParams, generate
    from mtprl.train.batch import TrainBatch
    from mtprl.train.config import TrainConfig
    from mtprl.train.distributed import Dist
    from mtprl.train.fsdp import ensure_process_group, gathered, shard_model
    from mtprl.train.update import build_optimizer, prepare_log_probs, train_on_batch

    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ensure_process_group(device)
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    dist = Dist()
    dist.rank, dist.world, dist.parallel, dist.device = rank, world, "fsdp", device
    shape = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512) if args.small else
             dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936))
    config = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=4096, pad_token_id=0,
                         eos_token_id=1, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = MTPCausalLM(config, 1).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    rows = args.prompts * args.group
    cfg = TrainConfig(regime="occ", prompts_per_step=args.prompts, group_size=args.group, mini_batches=2,
                      micro_batch_size=args.micro, max_new_tokens=args.new_tokens, parallel="fsdp",
                      dtype="bfloat16" if device.type == "cuda" else "float32")
    apply_regime(model, cfg.regime)
    shard_model(model, device, bf16_compute=device.type == "cuda")
    optimizer, scheduler = build_optimizer(model, cfg)

    def phase(name, fn, tokens):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"
        if rank == 0:
            print(f"{name:>10}: {dt:8.2f} s  {tokens(out) / dt:10.0f} tokens/s  peak memory {peak}")
        return out

    share = dist.share(args.prompts)
    g = torch.Generator().manual_seed(rank)
    prompts = [torch.randint(2, shape["vocab_size"], (args.prompt_tokens,), generator=g).tolist()
               for _ in range(share.stop - share.start)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, n=args.group)
    generator = torch.Generator(device=device).manual_seed(rank)
    with gathered(model):
        rollout = phase("rollout", lambda: generate(model, prompts, params, eos_token_id=None, generator=generator),
                        lambda r: int(r.lengths.sum()) * world)
    ids = dist.gather_rows(torch.cat([rollout.prompt_ids, rollout.response_ids], 1))
    mask = dist.gather_rows(torch.cat([rollout.prompt_mask.bool(), rollout.response_mask.bool()], 1))
    response = dist.gather_rows(rollout.response_mask.bool())
    advantages = torch.randn(rows, generator=torch.Generator().manual_seed(1)).to(device)
    batch = TrainBatch.build(ids, mask, response, advantages, 1)
    tokens = int(mask.sum())
    with gathered(model):
        phase("old lp", lambda: prepare_log_probs(model, None, batch, cfg, 1, dist), lambda _: tokens)
    metrics = phase("update", lambda: train_on_batch(model, optimizer, scheduler, batch, cfg, 1, dist),
                    lambda _: tokens)
    if rank == 0:
        print(f"model {n_params / 1e6:.0f} M parameters, {world} rank(s), {rows} sequences, {tokens} tokens; "
              f"pg/loss {metrics['pg/loss']:.4f}, grad_norm {metrics['grad_norm']:.3f}")
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
