"""One RL step of `mtprl train` against TRL's `GRPOTrainer`, side by side in one process, interleaved.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_trl.py [--rounds 6 --trl grpo|mtp|none --no-before --reuse
        --model DIR --device cpu|cuda --dtype float32|bfloat16
        --prompts 16 --dynamic --first-draws 2 --sort --all-options]

Same model (the shipped pre-trained tiny default, float32, one torch thread), same batch: 16
prompts x 8 samples of the default task families, <= 96 new tokens at T = 1, 4 optimiser steps
per rollout batch in micro-batches of 16, AdamW lr 1e-4, clip 0.2 / 0.28, token-mean loss, no KL,
no dynamic sampling, old log-probs recomputed by each. Variants:
- `mtprl`: `collect_batch` -> `prepare_log_probs` -> `train_on_batch` (the trainer's step; regime
  occ, exact-gradient diagnostics off as TRL has none), with the lean decode step (the default);
- `mtprl (before)`: the same with `mtprl.rollout.lean.ENABLED = False` (decoding through the
  transformers forward, today's path before the lean step); its losses must equal `mtprl`'s;
- `mtprl (reuse lp)` (with --reuse): the option `reuse_rollout_log_probs` (old log-probs from the
  sampler, no separate forward; an approximation, off by default);
- `mtprl (first K)` (with --dynamic --first-draws K): dynamic sampling's first K draws as one
  batch of the engine (the option `first_draws`, off by default);
- `mtprl (sorted mb)` (with --sort): the option `sort_micro_batches` (forwards on rows sorted by
  length and left-aligned: less padding; losses, OCC's ĉ and gradients the same up to float
  rounding); `mtprl (all opts)` (--all-options): every option on;
- `trl`: TRL's `GRPOTrainer` on the plain Qwen2 base (`loss_type="dapo"`, i.e. token-mean),
  `per_device_train_batch_size=16`, `gradient_accumulation_steps=2`, `steps_per_generation=8`;
- `trl+mtp`: our `MTPGRPOTrainer` (occ) with the same arguments.
TRL runs its own training loop; at every rollout-batch boundary (4 optimiser steps) a callback
runs one step of each mtprl variant, so every round times each variant once, in rotation, under
the same machine load. Round 0 is a warm-up and is dropped. Figures: median seconds per step by
this process's CPU time (steadier on a shared machine) and by wall clock, each phase's share of
the step, and ratios (other / mtprl: above 1 means mtprl is faster). Phases: generation (the
sampler itself: `mtprl.rollout.generate`, TRL's `_generate_single_turn`), rewards + old log-probs
(the rest of building the batch), update (forward, backward, optimiser steps).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import tempfile
import time
from collections import defaultdict

import torch

PHASES = ("generation", "rewards+old_lp", "update")
SYNC = [lambda: None]  # torch.cuda.synchronize on CUDA, so that every timer sees finished work


def now() -> tuple[float, float]:
    SYNC[0]()
    return time.perf_counter(), time.process_time()


class Clock:
    """Wall and CPU seconds per (variant, phase), one list entry per round."""

    def __init__(self):
        self.rows: dict[str, list[dict[str, tuple[float, float]]]] = defaultdict(list)
        self.current: dict[str, list[float]] | None = None

    def start(self) -> None:
        self.current = defaultdict(lambda: [0.0, 0.0])

    def add(self, phase: str, wall: float, cpu: float) -> None:
        if self.current is not None:
            self.current[phase][0] += wall
            self.current[phase][1] += cpu

    def finish(self, variant: str, wall: float, cpu: float) -> None:
        """Close a round of `variant` whose whole step took (wall, cpu); update = the step's remainder."""
        phases = {k: tuple(v) for k, v in self.current.items()}
        gen = phases.get("generation", (0.0, 0.0))
        built = phases.get("build", (0.0, 0.0))
        row = {"step": (wall, cpu), "generation": gen,
               "rewards+old_lp": (built[0] - gen[0], built[1] - gen[1]),
               "update": (wall - built[0], cpu - built[1])}
        self.rows[variant].append(row)
        self.current = None


def timed(clock: Clock, phase: str, fn):
    def wrapper(*args, **kwargs):
        w, c = now()
        try:
            return fn(*args, **kwargs)
        finally:
            w2, c2 = now()
            clock.add(phase, w2 - w, c2 - c)
    return wrapper


# ----- mtprl -----------------------------------------------------------------------------------
class MtprlVariant:
    """The trainer's step (mtprl.train.loop.Run.step without logging) on its own model and optimiser."""

    def __init__(self, name: str, lean_on: bool, model, tokenizer, cfg, clock: Clock):
        from mtprl.train.data import build_problems
        from mtprl.train.distributed import Dist
        from mtprl.train.update import build_optimizer

        self.name, self.lean_on, self.cfg, self.clock = name, lean_on, cfg, clock
        self.model, self.tokenizer = copy.deepcopy(model), tokenizer
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg)
        self.stream, self.reward_fn, _ = build_problems(cfg)
        self.dist, self.step_no, self.losses = Dist(), 0, []

    def step(self) -> None:
        from mtprl import rollout as _rollout
        from mtprl.rollout import lean
        from mtprl.train import rollouts
        from mtprl.train.update import prepare_log_probs, train_on_batch

        self.step_no += 1
        lean.ENABLED = self.lean_on
        original = rollouts.generate
        rollouts.generate = timed(self.clock, "generation", _rollout.generate)
        self.clock.start()
        w, c = now()
        try:
            batch, _ = rollouts.collect_batch(self.model, self.tokenizer, self.stream, self.reward_fn, self.cfg,
                                              self.step_no, self.dist)
            prepare_log_probs(self.model, None, batch, self.cfg, self.step_no, self.dist)
            w2, c2 = now()
            self.clock.add("build", w2 - w, c2 - c)
            metrics = train_on_batch(self.model, self.optimizer, self.scheduler, batch, self.cfg, self.step_no,
                                     self.dist, exact=False)
        finally:
            rollouts.generate = original
            lean.ENABLED = True
        w2, c2 = now()
        self.clock.finish(self.name, w2 - w, c2 - c)
        self.losses.append((metrics["pg/loss"], metrics["mtp/loss"], metrics["grad_norm"]))


# ----- TRL -------------------------------------------------------------------------------------
def trl_reward(prompts, completions, answer, family, difficulty, meta, **_):
    """mtprl's task rewards as one TRL reward function over mixed families."""
    from mtprl.tasks import Problem, get_task

    out = []
    for prompt, text, ans, fam, level, extra in zip(prompts, completions, answer, family, difficulty, meta):
        problem = Problem(prompt=prompt, answer=ans, solution="", family=fam, difficulty=int(level),
                          meta=json.loads(extra))
        out.append(get_task(fam).reward(problem, text))
    return out


def trl_trainer(kind: str, model, tokenizer, cfg, rounds: int, out_dir: str):
    from trl import GRPOConfig, GRPOTrainer

    from mtprl.integrations.trl import MTPGRPOTrainer, task_dataset
    from mtprl.train.data import build_problems

    stream, _, _ = build_problems(cfg)
    steps_per_rollout = cfg.mini_batches
    micro_per_mini = cfg.prompts_per_step * cfg.group_size // cfg.mini_batches // cfg.micro_batch_size
    data = task_dataset(stream.take(cfg.prompts_per_step * (rounds + 1)))
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=micro_per_mini,
        steps_per_generation=micro_per_mini * steps_per_rollout, num_generations=cfg.group_size,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, learning_rate=cfg.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        beta=0.0, loss_type="dapo", epsilon=cfg.clip_low, epsilon_high=cfg.clip_high, max_steps=steps_per_rollout * rounds,
        bf16=cfg.dtype == "bfloat16", gradient_checkpointing=False, report_to=[], logging_steps=10 ** 6,
        use_cpu=cfg.device == "cpu",
        save_strategy="no", disable_tqdm=True, seed=cfg.seed, shuffle_dataset=False,
    )
    if kind == "grpo":
        return GRPOTrainer(copy.deepcopy(model.base), reward_funcs=trl_reward, args=args, train_dataset=data,
                           processing_class=tokenizer), steps_per_rollout
    return MTPGRPOTrainer(copy.deepcopy(model), reward_funcs=trl_reward, args=args, train_dataset=data,
                          processing_class=tokenizer, mtp_regime=cfg.regime, mtp_coef=cfg.mtp_coef), steps_per_rollout


def instrument_trl(trainer, clock: Clock) -> None:
    """Time TRL's phases through two of GRPOTrainer's methods (TRL 1.x); a clear error if they are gone."""
    import trl

    for method in ("_generate_single_turn", "_generate_and_score_completions"):
        if not callable(getattr(trainer, method, None)):
            raise SystemExit(f"TRL {trl.__version__}'s GRPOTrainer has no {method}(); bench_trl times TRL's "
                             "generation and batch building through it (written for TRL 1.16): update instrument_trl")
    trainer._generate_single_turn = timed(clock, "generation", trainer._generate_single_turn)
    trainer._generate_and_score_completions = timed(clock, "build", trainer._generate_and_score_completions)


def run_rounds(name: str, trainer, per_round: int, mtprl_variants, clock: Clock) -> None:
    """TRL's own loop drives the rounds; at each rollout boundary its callback runs every mtprl variant once."""
    from transformers import TrainerCallback

    class Boundary(TrainerCallback):
        def __init__(self):
            self.mark = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.mark is None:
                clock.start()
                self.mark = now()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % per_round:
                return
            w, c = now()
            clock.finish(name, w - self.mark[0], c - self.mark[1])
            for v in mtprl_variants:
                v.step()
            print(f"  round {state.global_step // per_round - 1} done", flush=True)
            self.mark = None

    trainer.add_callback(Boundary())
    trainer.train()


# ----- report ----------------------------------------------------------------------------------
def report(clock: Clock, names: list[str]) -> None:
    med = {n: {k: (statistics.median(r[k][0] for r in clock.rows[n][1:]),
                   statistics.median(r[k][1] for r in clock.rows[n][1:])) for k in ("step", *PHASES)}
           for n in names}
    print(f"\nmedian over {len(clock.rows[names[0]]) - 1} rounds (round 0 dropped), seconds per RL step")
    print(f"{'':16} {'cpu step':>9} {'wall step':>9}  " + "  ".join(f"{p:>22}" for p in PHASES))
    for n in names:
        cells = [f"{med[n][p][1]:7.2f} s {100 * med[n][p][1] / med[n]['step'][1]:4.0f}%   " for p in PHASES]
        print(f"{n:16} {med[n]['step'][1]:7.2f} s {med[n]['step'][0]:7.2f} s  " + "  ".join(f"{c:>22}" for c in cells))
    base = med["mtprl"]
    print("\nratios other / mtprl by CPU time (> 1: mtprl is faster); per-round range of the step ratio")
    for n in names:
        if n == "mtprl":
            continue
        per_round = [clock.rows[n][i]["step"][1] / clock.rows["mtprl"][i]["step"][1]
                     for i in range(1, min(len(clock.rows[n]), len(clock.rows["mtprl"])))]
        parts = "  ".join(f"{p} {med[n][p][1] / max(base[p][1], 1e-9):5.2f}x" for p in PHASES)
        print(f"  {n:16} step {med[n]['step'][1] / base['step'][1]:5.2f}x "
              f"(rounds {min(per_round):.2f}-{max(per_round):.2f}; wall {med[n]['step'][0] / base['step'][0]:5.2f}x)  "
              f"{parts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds (plus one warm-up round)")
    ap.add_argument("--trl", choices=["grpo", "mtp", "none"], default="grpo",
                    help="TRL trainer: plain GRPOTrainer, our MTPGRPOTrainer (occ), or none (mtprl variants only)")
    ap.add_argument("--no-before", action="store_true", help="skip the mtprl variant without the lean decode step")
    ap.add_argument("--reuse", action="store_true", help="add an mtprl variant with the reuse_rollout_log_probs "
                                                         "option (an approximation, off by default)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per rollout batch (8 samples each)")
    ap.add_argument("--dynamic", action="store_true", help="mtprl variants with dynamic sampling (the demo's "
                                                           "recipe; TRL has none, so use with --trl none)")
    ap.add_argument("--first-draws", type=int, default=0, help="with --dynamic: add an mtprl variant with the "
                                                               "first_draws option at this value (off by default)")
    ap.add_argument("--sort", action="store_true", help="add an mtprl variant with the sort_micro_batches option")
    ap.add_argument("--all-options", action="store_true", help="add an mtprl variant with every speed option on "
                                                              "(reuse_rollout_log_probs, sort_micro_batches, and "
                                                              "first_draws from --first-draws)")
    ap.add_argument("--model", default="tiny-default", help="a local MTP / HF checkpoint directory (with its "
                                                            "tokenizer) instead of the shipped tiny default")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights of every variant (TRL then trains with bf16=True)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.device == "cuda":
        SYNC[0] = torch.cuda.synchronize
    import transformers
    import trl

    from mtprl.train.config import TrainConfig
    from mtprl.train.loop import base_model_path, load_model

    cfg = dataclasses.replace(TrainConfig(), dynamic_sampling=args.dynamic, kl_coef=0.0, exact_every=0,
                              prompts_per_step=args.prompts, model=args.model, device=args.device, dtype=args.dtype)
    model, tokenizer = load_model(base_model_path(cfg), cfg, torch.device(args.device))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{args.model} {args.dtype} on {args.device}, 1 CPU thread; {cfg.prompts_per_step} prompts x {cfg.group_size}, <= {cfg.max_new_tokens} new tokens, "
          f"{cfg.mini_batches} optimiser steps per rollout, micro-batch {cfg.micro_batch_size}, regime {cfg.regime}"
          f"{', dynamic sampling' if cfg.dynamic_sampling else ''}",
          flush=True)
    clock, rounds = Clock(), args.rounds + 1
    variants = [MtprlVariant("mtprl", True, model, tokenizer, cfg, clock)]
    if not args.no_before:
        variants.append(MtprlVariant("mtprl (before)", False, model, tokenizer, cfg, clock))
    if args.reuse:
        variants.append(MtprlVariant("mtprl (reuse lp)", True, model, tokenizer,
                                     dataclasses.replace(cfg, reuse_rollout_log_probs=True), clock))
    if args.first_draws:
        variants.append(MtprlVariant(f"mtprl (first {args.first_draws})", True, model, tokenizer,
                                     dataclasses.replace(cfg, first_draws=args.first_draws), clock))
    if args.sort:
        variants.append(MtprlVariant("mtprl (sorted mb)", True, model, tokenizer,
                                     dataclasses.replace(cfg, sort_micro_batches=True), clock))
    if args.all_options:
        variants.append(MtprlVariant("mtprl (all opts)", True, model, tokenizer, dataclasses.replace(
            cfg, sort_micro_batches=True, reuse_rollout_log_probs=True, first_draws=max(args.first_draws, 1)), clock))
    names = [v.name for v in variants]
    with tempfile.TemporaryDirectory() as tmp:
        if args.trl != "none":
            name = {"grpo": "trl", "mtp": "trl+mtp"}[args.trl]
            trainer, per_round = trl_trainer(args.trl, model, tokenizer, cfg, rounds, f"{tmp}/{args.trl}")
            instrument_trl(trainer, clock)
            names.append(name)
            run_rounds(name, trainer, per_round, variants, clock)
        else:
            for r in range(rounds):
                for v in variants:
                    v.step()
    if not args.no_before:
        same = variants[0].losses == variants[1].losses
        print(f"mtprl with and without the lean decode step: per-step pg loss, MTP loss, grad norm "
              f"{'identical' if same else 'DIFFERENT'} over {len(variants[0].losses)} steps")
    report(clock, names)


if __name__ == "__main__":
    main()
