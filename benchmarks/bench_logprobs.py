"""Peak memory and time of per-token log-probs (main + 1 MTP head), chunked vs naive, forward + backward.

    python benchmarks/bench_logprobs.py [--vocab 32000 --seq 2048 --batch 4 --hidden 256 --layers 2]

Each variant runs in its own subprocess so that its peak resident memory (ru_maxrss, minus the
memory held before the forward) is not polluted by the other. "naive" materialises the full
[B, L, V] logits of every head and takes log_softmax + gather, as most RL code does; "chunked" is
`MTPCausalLM.token_log_probs`. Figures are printed side by side with their ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def build(args):
    from transformers import Qwen2Config

    from mtprl.model import MTPCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=args.seq, tie_word_embeddings=False, pad_token_id=0)
    model = MTPCausalLM(cfg, 1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq))
    return model, ids


def naive_log_probs(model, ids):
    """Full logits for every head at once: the baseline."""
    mask = torch.ones_like(ids)
    pos = model.position_ids(mask.bool())
    hidden, _ = model.trunk(ids, mask, pos)
    logits = model.logits(hidden).float()  # [B, L, V]
    main = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    next_ids = torch.zeros_like(ids)
    next_ids[:, :-1] = ids[:, 1:]
    h1 = model.mtp_hidden(0, hidden, next_ids, mask, pos)
    mtp_logits = model.mtp_logits(0, h1).float()  # [B, L, V]
    mtp = torch.log_softmax(mtp_logits[:, :-2], -1).gather(-1, ids[:, 2:, None]).squeeze(-1)
    return main.sum() + mtp.sum()


def chunked_log_probs(model, ids):
    out = model.token_log_probs(ids)
    return out.log_probs.sum() + out.mtp_log_probs.sum()


def measure(variant: str, args) -> dict:
    model, ids = build(args)
    fn = naive_log_probs if variant == "naive" else chunked_log_probs
    fn(model, ids[:1, :64]).backward()  # warm-up on a small slice
    model.zero_grad(set_to_none=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fn(model, ids).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "seconds": seconds, "peak_extra_mib": (peak - before) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return
    rows = {}
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        rows[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())
    print(f"vocab {args.vocab}, seq {args.seq}, batch {args.batch}, hidden {args.hidden}, layers {args.layers}, "
          f"1 MTP head; forward + backward on {torch.get_num_threads()} CPU threads")
    print(f"{'variant':<10}{'time (s)':>10}{'peak extra (MiB)':>18}")
    for r in rows.values():
        print(f"{r['variant']:<10}{r['seconds']:>10.2f}{r['peak_extra_mib']:>18.0f}")
    n, c = rows["naive"], rows["chunked"]
    print(f"ratio naive/chunked: memory {n['peak_extra_mib'] / max(c['peak_extra_mib'], 1):.1f}x, "
          f"time {n['seconds'] / c['seconds']:.2f}x")


if __name__ == "__main__":
    main()
