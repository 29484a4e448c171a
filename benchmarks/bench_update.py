"""Time of one training update (the mini-batch loop, no rollout) for detach, policy and occ, side by side.

    python benchmarks/bench_update.py [--rows 128 --prompt 32 --response 96 --repeats 5 --device cpu]

All regimes run in this one process on the same rollout batch (random token ids and advantages,
responses of varying length) from the same initial weights of the tiny default (hidden 128,
4 layers, 1 MTP layer, random init) with `TrainConfig`'s defaults: 4 mini-batches, micro-batches
of 16, token-mean. One timed update = `mtprl.train.update.train_on_batch`, exactly the trainer's
code path (forward, losses, backward, AdamW steps); old log-probs are computed beforehand and not
timed. Regimes are interleaved in every repeat so that drift in the machine's load hits them
alike; ratios are given of the medians and of the minima (the minimum is the least disturbed by
other processes on a shared machine). The paper claims OCC is nearly free; our targets on this setting:
occ/policy <= 1.02 and occ/detach <= 1.10.

Note: the trainer logs the proxy ĉ under every regime (a diagnostic), so policy and detach pay for
the proxy too; its own cost is timed separately below (`occ_coefficient` on the same micro-batches).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

REGIMES = ("detach", "policy", "occ")


def make_batch(rows: int, prompt: int, response: int, num_heads: int, device: torch.device, seed: int = 0):
    from mtprl.train.batch import TrainBatch

    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(prompt // 2, prompt + 1, (rows,), generator=g)
    resp_len = torch.randint(response // 4, response + 1, (rows,), generator=g)
    cols = torch.arange(prompt + response)
    attn = (cols >= prompt - prompt_len[:, None]) & (cols < prompt + resp_len[:, None])
    ids = torch.where(attn, torch.randint(3, 99, (rows, prompt + response), generator=g), 0)
    batch = TrainBatch.build(ids, attn, attn[:, prompt:], torch.randn(rows, generator=g), num_heads)
    for name in ("input_ids", "attention_mask", "response_mask", "advantages", "loss_mask", "head_mask"):
        setattr(batch, name, getattr(batch, name).to(device))
    return batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_update(base, regime: str, batch, device) -> float:
    from mtprl.model import apply_regime
    from mtprl.train.config import TrainConfig
    from mtprl.train.distributed import Dist
    from mtprl.train.update import build_optimizer, prepare_log_probs, train_on_batch

    cfg = TrainConfig(regime=regime, prompts_per_step=batch.size // 8, group_size=8)
    model = copy.deepcopy(base)
    apply_regime(model, regime)
    optimizer, scheduler = build_optimizer(model, cfg)
    dist = Dist()
    dist.device = device
    prepare_log_probs(model, None, batch, cfg, step=1, dist=dist)
    sync(device)
    start = time.perf_counter()
    train_on_batch(model, optimizer, scheduler, batch, cfg, step=1, dist=dist)
    sync(device)
    return time.perf_counter() - start


def time_proxy(base, batch, device) -> float:
    """Seconds spent on `occ_coefficient` alone over the update's micro-batches (4 mini-batches of 16 × 2)."""
    from mtprl.losses import occ_coefficient

    with torch.no_grad():
        model = copy.deepcopy(base)
        lp = model.token_log_probs(batch.input_ids[:16], batch.attention_mask[:16], mtp=True)
        P = batch.prompt_len
        main, head = lp.log_probs[:, P:], lp.mtp_log_probs[0, :, P:]
        old = main + 0.01 * torch.randn_like(main)
        mask = batch.head_mask[0, :16]
        sync(device)
        start = time.perf_counter()
        for _ in range(batch.size // 16):
            occ_coefficient(head, main, old, mask)
        sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=128, help="sequences in the rollout batch (16 prompts × 8)")
    parser.add_argument("--prompt", type=int, default=32, help="longest prompt (tokens)")
    parser.add_argument("--response", type=int, default=96, help="longest response (tokens)")
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per regime (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mtprl.model import build_tiny_model, build_tokenizer

    device = torch.device(args.device)
    base = build_tiny_model(build_tokenizer(), num_mtp_layers=1, seed=0).to(device).eval()
    batch = make_batch(args.rows, args.prompt, args.response, 1, device)
    times = {r: [] for r in REGIMES}
    for repeat in range(args.repeats + 1):
        for regime in REGIMES:
            elapsed = time_update(base, regime, batch, device)
            if repeat:  # the first round warms up
                times[regime].append(elapsed)
    med = {r: statistics.median(t) for r, t in times.items()}
    low = {r: min(t) for r, t in times.items()}
    tokens = int(batch.loss_mask.sum())
    print(f"update of {args.rows} sequences ({tokens} response tokens), 4 mini-batches × micro-batches of 16, "
          f"{args.device}, threads={torch.get_num_threads()}, {args.repeats} repeats")
    print(f"  {'regime':7s} {'median s':>9s} {'min s':>9s} {'max s':>9s}")
    for regime in REGIMES:
        print(f"  {regime:7s} {med[regime]:9.3f} {low[regime]:9.3f} {max(times[regime]):9.3f}")
    for a, b, target in (("occ", "policy", 1.02), ("occ", "detach", 1.10)):
        print(f"  {a}/{b} = {med[a] / med[b]:.3f} (medians), {low[a] / low[b]:.3f} (minima)   target <= {target}")
    proxy = time_proxy(base, batch, device)
    share = proxy / med["policy"] * 100
    print(f"  proxy ĉ alone: {proxy * 1e3:.2f} ms per update = {share:.2f}% of the policy update")


if __name__ == "__main__":
    main()
