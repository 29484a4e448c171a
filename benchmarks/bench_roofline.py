"""Roofline of one default RL step, mtprl and TRL: FLOPs counted, GEMMs timed at their own shapes, bounds.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_roofline.py [--rounds 2 --prompts 16
        --trl grpo|none --sort]

Prints figures, asserts nothing. Same setting as `bench_trl.py` (whose variants it reuses): the
shipped tiny default, float32, one thread, 16 prompts x 8, <= 96 new tokens, 4 optimiser steps of
2 micro-batches of 16, regime occ, no KL, no dynamic sampling.

1. Count. One RL step of each side runs under a dispatch mode that records every matrix-multiply
   class aten op the step issues (mm, addmm, bmm, baddbmm, and CPU SDPA forward and backward),
   with its shapes, strides and phase (generation; old log-probs, i.e. the rest of building the
   batch; update: forward + backward of trunk, MTP layer and head, all mini-batches). FLOPs are
   torch's own flop formulas (`torch.utils.flop_counter`; CPU flash attention, which torch does not
   count, as 4·B·H·Lq·Lk·D forward and twice that backward). Only these ops are counted: norms,
   softmax, rotary, AdamW, sampling are treated as free, which makes every bound below optimistic.
2. Useful work. The same update and old-log-prob passes run again row by row, each row cut to its
   own tokens (`TrainBatch.select` of one row: no padding at all), under the same counter: the FLOPs
   a padding-free implementation computes. Their difference to (1) is the padding share. For
   generation: decode rows computed vs response tokens kept.
3. Rate. Every distinct (op, shapes, strides) of (1) is replayed alone on random tensors, one
   thread, CPU time (`time.process_time`, so other processes on the machine do not count), and the
   peak is a 1024^3 and a 2048^3 fp32 mm. Bound at the per-shape rate = sum over the recorded ops
   of (calls x measured time of that shape): the step's time if everything but these ops were free
   and each ran at the rate this machine gives that shape. Bound at peak = FLOPs / peak.
4. Measured. `--rounds` interleaved timed steps of each side (after the recorded one), CPU and
   wall: the real time beside the bounds, and ratios TRL / mtprl.
The verdict line: the best TRL / mtprl step ratio reachable without changing what is computed is
TRL's measured step over mtprl's bound at the per-shape rate (everything else in mtprl made free).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trl  # noqa: E402  (the variants and TRL set-up of the side-by-side benchmark)

PHASES = ("generation", "old_lp", "update")
aten = torch.ops.aten
SDPA_CPU = {"_scaled_dot_product_flash_attention_for_cpu": 1.0,
            "_scaled_dot_product_flash_attention_for_cpu_backward": 2.0}  # x forward FLOPs
GEMMS = {"mm", "addmm", "bmm", "baddbmm", *SDPA_CPU}


def _spec(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(_spec(v) for v in x)
    return x


def _sdpa_flops(q_shape, k_shape) -> float:
    b, h, lq, d = q_shape
    return 4.0 * b * h * lq * k_shape[2] * d


class Recorder(TorchDispatchMode):
    """Counts calls of every GEMM-class op by (phase, op, argument specs); FLOPs per call."""

    def __init__(self):
        super().__init__()
        self.phase = ["update"]
        self.calls: dict[tuple, int] = defaultdict(int)
        self.flops: dict[tuple, float] = {}
        self.funcs: dict[tuple, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in GEMMS:
            key = (name, _spec(args), _spec(tuple(sorted(kwargs.items()))))
            if key not in self.flops:
                if name in SDPA_CPU:
                    q, k = (args[1], args[2]) if name.endswith("backward") else (args[0], args[1])
                    self.flops[key] = SDPA_CPU[name] * _sdpa_flops(q.shape, k.shape)
                else:
                    self.flops[key] = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
                self.funcs[key] = func
            self.calls[(self.phase[-1], key)] += 1
        return out

    def in_phase(self, phase: str, fn):
        def wrapper(*a, **k):
            self.phase.append(phase)
            try:
                return fn(*a, **k)
            finally:
                self.phase.pop()
        return wrapper

    def total(self, phase: str) -> float:
        return sum(n * self.flops[key] for (p, key), n in self.calls.items() if p == phase)


# ----- replay at the recorded shapes -------------------------------------------------------------
def _make(spec):
    if isinstance(spec, tuple) and spec and spec[0] == "T":
        _, shape, stride, dtype = spec
        size = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
        if dtype.is_floating_point:
            base = torch.randn(size, dtype=dtype) * 0.1
        else:
            base = torch.ones(size, dtype=dtype)
        return base.as_strided(shape, stride)
    if isinstance(spec, tuple):
        return tuple(_make(s) for s in spec)
    return spec


def time_call(func, key, budget: float = 0.004) -> float:
    """CPU seconds of one call of `func` at the recorded specs (best of 3 blocks of repeated calls)."""
    _, arg_specs, kw_specs = key
    args = list(_make(arg_specs))
    kwargs = dict(_make(kw_specs))
    func(*args, **kwargs)
    t0 = time.process_time()
    func(*args, **kwargs)
    one = max(time.process_time() - t0, 1e-7)
    reps = max(1, min(2000, int(budget / one)))
    best = math.inf
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(reps):
            func(*args, **kwargs)
        best = min(best, (time.process_time() - t0) / reps)
    return best


def peak_rate() -> dict[int, float]:
    out = {}
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = math.inf
        for _ in range(3):
            t0 = time.process_time()
            a @ b
            best = min(best, time.process_time() - t0)
        out[n] = 2.0 * n ** 3 / best
    return out


def bounds(rec: Recorder, cache: dict) -> dict[str, dict[str, float]]:
    """Per phase: FLOPs, calls, GEMM-bound seconds at the per-shape rate."""
    out = {p: {"flops": 0.0, "calls": 0, "gemm_s": 0.0, "attn_flops": 0.0, "attn_s": 0.0} for p in PHASES}
    for (phase, key), n in rec.calls.items():
        if key not in cache:
            cache[key] = time_call(rec.funcs[key], key)
        out[phase]["flops"] += n * rec.flops[key]
        out[phase]["calls"] += n
        out[phase]["gemm_s"] += n * cache[key]
        if key[0] in SDPA_CPU:
            out[phase]["attn_flops"] += n * rec.flops[key]
            out[phase]["attn_s"] += n * cache[key]
    return out


def shape_table(rec: Recorder, cache: dict, phase: str, top: int) -> list[str]:
    """The `top` op shapes of a phase by bound time: calls, GFLOP, GFLOP/s."""
    rows = []
    for (p, key), n in rec.calls.items():
        if p != phase:
            continue
        shapes = " x ".join(str(list(s[1])) for s in key[1] if isinstance(s, tuple) and s and s[0] == "T")
        rows.append((n * cache[key], key[0], shapes, n, n * rec.flops[key], rec.flops[key] / cache[key]))
    rows.sort(reverse=True)
    return [f"    {name:>10} {shapes[:70]:70} {n:6d} calls {fl / 1e9:7.3f} GFLOP {rate / 1e9:6.1f} GFLOP/s  {t:6.3f} s"
            for t, name, shapes, n, fl, rate in rows[:top]]


# ----- useful (padding-free) work of the update and old log-probs ----------------------------------
def useful_flops(model, batch, cfg, step: int) -> dict[str, float]:
    """FLOPs of old log-probs and the update computed row by row, each row without padding."""
    from mtprl.train.batch import Counts, response_log_probs
    from mtprl.train.update import microbatch_loss, update_plan

    model = copy.deepcopy(model)
    rec = Recorder()
    with rec:
        rec.phase.append("old_lp")
        with torch.no_grad():
            for r in range(batch.size):
                response_log_probs(model, batch.select(torch.tensor([r])), cfg.temperature, mtp=False)
        rec.phase[-1] = "update"
        for rows, _ in update_plan(batch.size, cfg, step):
            counts = Counts.of(batch, rows)
            for r in rows.tolist():
                loss, _ = microbatch_loss(model, batch.select(torch.tensor([r])), cfg, counts)
                loss.backward()
            model.zero_grad(set_to_none=True)
    return {p: rec.total(p) for p in ("old_lp", "update")}


def tokens_of(batch, layout_rows) -> tuple[int, int]:
    """(tokens computed as rectangles of the micro-batches, real tokens) of one pass over `layout_rows`."""
    computed = real = 0
    for rows in layout_rows:
        mb = batch.select(rows)
        computed += mb.input_ids.numel()
        real += int(mb.attention_mask.sum())
    return computed, real


# ----- main -------------------------------------------------------------------------------------
def record_mtprl(variant, rec: Recorder):
    """One step of an mtprl variant under the recorder, phases attributed; returns its batch."""
    import mtprl.rollout
    from mtprl.train import rollouts, update

    seen = {}
    originals = (mtprl.rollout.generate, update.prepare_log_probs, update.train_on_batch, rollouts.collect_batch)

    def collect(*a, **k):
        out = rec.in_phase("old_lp", originals[3])(*a, **k)
        seen["batch"] = out[0]
        return out

    # MtprlVariant.step looks these up at call time (mtprl.rollout.generate through its own timer).
    mtprl.rollout.generate = rec.in_phase("generation", originals[0])
    update.prepare_log_probs = rec.in_phase("old_lp", originals[1])
    update.train_on_batch = rec.in_phase("update", originals[2])
    rollouts.collect_batch = collect
    try:
        with rec:
            variant.step()
    finally:
        mtprl.rollout.generate, update.prepare_log_probs, update.train_on_batch, rollouts.collect_batch = originals
    return seen["batch"]


def record_trl(trainer, rec: Recorder, steps: int) -> dict[str, list[int]]:
    """One rollout batch (`steps` optimiser steps) of TRL under the recorder; tokens per phase:
    [computed (input_ids entries), real (attention mask)], generation [decode row-steps, tokens kept]."""
    tokens = defaultdict(lambda: [0, 0])
    generate = trainer._generate_single_turn

    def gen(*a, **k):
        out = generate(*a, **k)
        tokens["generation"][1] += sum(len(c) for c in out[0])
        return out

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        phase = rec.phase[-1]
        if phase == "generation":
            tokens[phase][0] += ids.shape[0] if ids.shape[1] == 1 else 0
        else:
            tokens[phase][0] += ids.numel()
            tokens[phase][1] += int(mask.sum()) if mask is not None else ids.numel()

    trainer._generate_single_turn = rec.in_phase("generation", gen)
    trainer._generate_and_score_completions = rec.in_phase("old_lp", trainer._generate_and_score_completions)
    trainer.args.max_steps = steps
    handle = trainer.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with rec:
            trainer.train()
    finally:
        handle.remove()
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="timed steps of each side after the recorded one")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--trl", choices=["grpo", "none"], default="grpo")
    ap.add_argument("--sort", action="store_true", help="also the sort_micro_batches option's padding and bound")
    ap.add_argument("--top", type=int, default=6, help="op shapes listed per phase")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers
    import trl

    from mtprl.train.batch import micro_batches, minibatch_rows, sort_lengths
    from mtprl.train.config import TrainConfig
    from mtprl.train.distributed import Dist
    from mtprl.train.loop import base_model_path, load_model

    cfg = dataclasses.replace(TrainConfig(), dynamic_sampling=False, kl_coef=0.0, exact_every=0,
                              prompts_per_step=args.prompts)
    model, tokenizer = load_model(base_model_path(cfg), cfg, torch.device("cpu"))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; tiny default "
          f"float32, 1 thread; {cfg.prompts_per_step} prompts x {cfg.group_size}, <= {cfg.max_new_tokens} tokens, "
          f"{cfg.mini_batches} optimiser steps, micro-batch {cfg.micro_batch_size}, regime {cfg.regime}", flush=True)
    peaks = peak_rate()
    peak = max(peaks.values())
    print("fp32 mm peak, 1 thread (CPU time): " + ", ".join(f"{n}^3 {r / 1e9:.1f} GFLOP/s" for n, r in peaks.items()))

    clock = bench_trl.Clock()
    configs = {"mtprl": cfg}
    if args.sort:
        configs["mtprl (sorted mb)"] = dataclasses.replace(cfg, sort_micro_batches=True)
    variants = {n: bench_trl.MtprlVariant(n, True, model, tokenizer, c, clock) for n, c in configs.items()}
    recs, batches, cache = {}, {}, {}
    for name, v in variants.items():
        recs[name] = Recorder()
        batches[name] = record_mtprl(v, recs[name])
        v.clock.rows.clear()

    with tempfile.TemporaryDirectory() as tmp:
        if args.trl != "none":
            rec_trainer, per_round = bench_trl.trl_trainer("grpo", model, tokenizer, cfg, 1, f"{tmp}/rec")
            recs["trl"] = Recorder()
            trl_tokens = record_trl(rec_trainer, recs["trl"], per_round)
            del rec_trainer
        print("recorded one step of each; timing the recorded shapes ...", flush=True)
        b = {name: bounds(rec, cache) for name, rec in recs.items()}
        # measured, interleaved: TRL's own loop drives the rounds, the mtprl variants run at each boundary
        if args.trl != "none":
            trainer, per_round = bench_trl.trl_trainer("grpo", model, tokenizer, cfg, args.rounds + 1, f"{tmp}/t")
            bench_trl.instrument_trl(trainer, clock)
            bench_trl.run_rounds("trl", trainer, per_round, list(variants.values()), clock)
        else:
            for _ in range(args.rounds + 1):
                for v in variants.values():
                    v.step()
    names = list(recs)
    med = {n: {k: statistics.median(r[k][1] for r in clock.rows[n][1:]) for k in ("step", "generation",
                                                                               "rewards+old_lp", "update")}
           for n in names}
    wall = {n: statistics.median(r["step"][0] for r in clock.rows[n][1:]) for n in names}
    meas = {n: {"generation": med[n]["generation"], "old_lp": med[n]["rewards+old_lp"], "update": med[n]["update"]}
            for n in names}

    # padding and useful work of mtprl's update / old log-probs
    print("\npadding (mtprl's batch of the recorded step)")
    useful = {}
    for name in variants:
        batch, c = batches[name], configs[name]
        layout = [mb for rows in minibatch_rows(batch.size, c.mini_batches, c.seed, 1, 0)
                  for mb in micro_batches(rows, Dist(), c.micro_batch_size, sort_lengths(batch, c))]
        computed, real = tokens_of(batch, layout)
        useful[name] = useful_flops(variants[name].model, batch, c, 1)
        upd, olp = b[name]["update"]["flops"], b[name]["old_lp"]["flops"]
        print(f"  {name:18} rows {batch.size}, prompt width {batch.prompt_len}, response width "
              f"{batch.response_mask.shape[1]}, mean response {float(batch.response_mask.sum(1).float().mean()):.1f}; "
              f"one pass: {computed} tokens computed, {real} real ({100 * (1 - real / computed):.1f}% padding)")
        print(f"  {'':18} FLOPs update {upd / 1e9:.2f} G, padding-free {useful[name]['update'] / 1e9:.2f} G "
              f"-> {100 * (1 - useful[name]['update'] / upd):.1f}% of the update is padding; old log-probs "
              f"{olp / 1e9:.2f} G vs {useful[name]['old_lp'] / 1e9:.2f} G "
              f"({100 * (1 - useful[name]['old_lp'] / olp):.1f}%)")
        kept = int(batch.response_mask.sum())
        print(f"  {'':18} generation: {kept} response tokens, decode rows computed = tokens kept (finished rows "
              f"leave the batch)")
    if "trl" in recs:
        t = trl_tokens
        print(f"  {'trl':18} generation: {t['generation'][1]} completion tokens kept, {t['generation'][0]} decode "
              f"row-steps computed ({100 * (1 - t['generation'][1] / max(t['generation'][0], 1)):.1f}% wasted on "
              f"finished rows)")
        for p in ("old_lp", "update"):
            print(f"  {'':18} {p}: {t[p][0]} tokens computed, {t[p][1]} real "
                  f"({100 * (1 - t[p][1] / max(t[p][0], 1)):.1f}% padding)")

    print("\nroofline per phase: GFLOP counted | bound at peak | bound at the per-shape GEMM rate | measured CPU s "
          "(median of rounds) | achieved GFLOP/s, % of peak")
    for n in names:
        tot = {"flops": 0.0, "gemm_s": 0.0, "meas": 0.0}
        for p in PHASES:
            f, g, m = b[n][p]["flops"], b[n][p]["gemm_s"], meas[n][p]
            tot["flops"] += f
            tot["gemm_s"] += g
            tot["meas"] += m
            print(f"  {n:18} {p:10} {f / 1e9:8.2f} GFLOP {f / peak:6.3f} s {g:6.3f} s {m:6.3f} s   "
                  f"{f / max(m, 1e-9) / 1e9:5.1f} GFLOP/s {100 * f / max(m, 1e-9) / peak:4.0f}%  "
                  f"({b[n][p]['calls']} GEMM calls; attention {100 * b[n][p]['attn_flops'] / max(f, 1):.0f}% of "
                  f"FLOPs, {b[n][p]['attn_s']:.3f} s of the bound)")
        f = tot["flops"]
        print(f"  {n:18} {'STEP':10} {f / 1e9:8.2f} GFLOP {f / peak:6.3f} s {tot['gemm_s']:6.3f} s "
              f"{med[n]['step']:6.3f} s   {f / med[n]['step'] / 1e9:5.1f} GFLOP/s {100 * f / med[n]['step'] / peak:4.0f}%"
              f"  (wall {wall[n]:.3f} s)")
        b[n]["step"] = tot
    for n in names:
        print(f"\n  top op shapes of {n}'s update and generation (by bound time):")
        for p in ("update", "generation"):
            print(f"   {p}:")
            print("\n".join(shape_table(recs[n], cache, p, args.top)))

    if "trl" in recs:
        t_trl = med["trl"]["step"]
        print("\nverdict inputs (CPU seconds per step)")
        for n in variants:
            bound = b[n]["step"]["gemm_s"]
            free = b[n]["generation"]["gemm_s"] + sum(b[n][p]["gemm_s"] * useful[n][p] / b[n][p]["flops"]
                                                      for p in ("old_lp", "update"))
            print(f"  {n}: bound without padding (update and old log-probs at their padding-free FLOPs, same rates) "
                  f"{free:.3f} s -> best TRL/{n} {t_trl / free:.2f}x; also without the old-log-prob pass "
                  f"(reuse_rollout_log_probs, an approximation) "
                  f"{free - b[n]['old_lp']['gemm_s'] * useful[n]['old_lp'] / b[n]['old_lp']['flops']:.3f} s")
            print(f"  {n}: measured {med[n]['step']:.3f} s (TRL/{n} {t_trl / med[n]['step']:.2f}x); "
                  f"bound at per-shape rate {bound:.3f} s -> best TRL/{n} {t_trl / bound:.2f}x; "
                  f"bound at peak {b[n]['step']['flops'] / peak:.3f} s -> {t_trl * peak / b[n]['step']['flops']:.2f}x; "
                  f"2x TRL needs a step <= {t_trl / 2:.3f} s, i.e. non-GEMM time <= {t_trl / 2 - bound:.3f} s "
                  f"(today {med[n]['step'] - bound:.3f} s)")
        print(f"  trl: measured {t_trl:.3f} s, bound at per-shape rate {b['trl']['step']['gemm_s']:.3f} s")


if __name__ == "__main__":
    main()
