"""Cost of the gradient diagnostics beside one training update: same-batch exact terms and held-out terms.

    python benchmarks/bench_diagnostics.py [--rows 128 --prompt 32 --response 96 --repeats 3 --threads 1]

On one rollout batch (random ids and advantages, as in bench_update.py) of the tiny default (random init):
the update of a rollout batch without diagnostics (`train_on_batch`, 4 mini-batches), the same-batch
`exact_terms` (first micro-batch of a mini-batch) and `heldout_terms` (the whole batch in two halves:
one forward and K + 1 gradient calls per micro-batch), each timed alone, interleaved over repeats. Times
are CPU seconds of this process (`time.process_time`), which a busy shared machine disturbs less than
wall time; ratios are to the update's median. A step with diagnostics (every `exact_every` steps) costs
update + exact + held-out.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bench_update import make_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--response", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mtprl.model import apply_regime, build_tiny_model, build_tokenizer
    from mtprl.train.config import TrainConfig
    from mtprl.train.distributed import Dist
    from mtprl.train.exact import exact_terms, heldout_terms
    from mtprl.train.update import build_optimizer, minibatch_update, prepare_log_probs, train_on_batch

    base = build_tiny_model(build_tokenizer(), num_mtp_layers=1, seed=0).eval()
    batch = make_batch(args.rows, args.prompt, args.response, 1, torch.device("cpu"))
    cfg = TrainConfig(regime="policy", prompts_per_step=args.rows // 8, group_size=8)
    dist = Dist()
    times = {"update": [], "exact": [], "heldout": []}
    for repeat in range(args.repeats + 1):
        model = copy.deepcopy(base)
        apply_regime(model, cfg.regime)
        optimizer, scheduler = build_optimizer(model, cfg)
        prepare_log_probs(model, None, batch, cfg, step=1, dist=dist)
        start = time.process_time()
        train_on_batch(model, optimizer, scheduler, batch, cfg, step=1, dist=dist)
        update = time.process_time() - start
        minibatch_update(model, optimizer, scheduler, batch, torch.arange(16), cfg, dist)
        start = time.process_time()
        exact_terms(model, batch, torch.arange(32), cfg, dist)
        exact = time.process_time() - start
        start = time.process_time()
        heldout_terms(model, optimizer, batch, cfg, 1, dist)
        held = time.process_time() - start
        if repeat:  # the first round warms up
            for key, value in (("update", update), ("exact", exact), ("heldout", held)):
                times[key].append(value)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = int(batch.loss_mask.sum())
    print(f"rollout batch of {args.rows} sequences ({tokens} response tokens), tiny default, "
          f"threads={torch.get_num_threads()}, {args.repeats} repeats, CPU seconds (median)")
    for key, label in (("update", "update (4 mini-batches)"), ("exact", "same-batch exact terms"),
                       ("heldout", "held-out terms")):
        print(f"  {label:26s} {med[key]:8.3f} s   {med[key] / med['update']:.2f}x the update")
    print(f"  a step with diagnostics: {(med['update'] + med['exact'] + med['heldout']) / med['update']:.2f}x "
          "the update")


if __name__ == "__main__":
    main()
