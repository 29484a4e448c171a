"""`train(cfg)`: the RL loop of `mtprl train` — rollout → rewards → advantages → mini-batch updates.

Per step: draw prompts and sample `group_size` responses each (`rollouts.collect_batch`, with DAPO
dynamic sampling and overlong shaping), recompute old (and reference) log-probs with the model in
training precision, then `epochs` × `mini_batches` AdamW steps (`update.train_on_batch`) with the
regime's MTP term. Every step logs one `train` record; every `eval_every` steps and at the end an
`eval` record; every `save_every` steps and at the end an atomic checkpoint. Same config and seed,
same metrics (the `time` fields and `time/*`, `rollout/tokens_per_s` aside), resumed or not; resumed on another
number of processes too when the run samples with `rollout_rng: prompt` (then `rollout/verify_steps`, a count
of each worker's decode forwards averaged over workers, differs; a `batch` run refuses that resume).

Run directory: config.yaml, metrics.jsonl, summary.json, checkpoints/step-XXXXXXXX/, and `.lock`
while a process writes it.

Start-up goes from cheap to expensive, and writes nothing before the model is built: config →
model directory and data (every row) → launch (printed: processes, backend, device, threads) →
run-directory lock and state, checkpoint verification and settings (`rundir.plan_start`) and process count
(`checkpoint.resume_world_problem`) →
pre-training of the embedded base if it is not cached → model, optimizer and trainer state →
only then the first write (`rundir.commit_start`: an `--overwrite` replaces the old run here).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from mtprl.config import ConfigError, config_to_dict
from mtprl.losses.offpolicy import rollout_mismatch
from mtprl.model import MTPCausalLM, apply_regime, load_tokenizer
from mtprl.model.checkpoint import check_checkpoint_dir
from mtprl.train.checkpoint import (
    CheckpointError, is_sharded_checkpoint, load_trainer_state, resume_world_problem, save_checkpoint,
)
from mtprl.train.config import TINY_DEFAULT, TrainConfig, checked
from mtprl.train.data import ProblemStream, RewardFn, build_problems
from mtprl.train.distributed import Dist, describe_launch, launch_mismatch
from mtprl.train.evaluate import evaluate, write_problem_results
from mtprl.train.fsdp import (
    check_sharded_run, ensure_process_group, gathered, iter_full_state, release_process_group, shard_model,
)
from mtprl.train.metrics import MetricsLog, Progress
from mtprl.train.rundir import RunLock, StartPlan, commit_start, plan_start, print_notes
from mtprl.train.rollouts import collect_batch
from mtprl.train.update import build_optimizer, prepare_log_probs, train_on_batch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def base_model_path(cfg: TrainConfig) -> Path:
    """The checkpoint directory the run starts from (pre-training the embedded default if needed)."""
    if cfg.model != TINY_DEFAULT:
        return Path(cfg.model)
    from mtprl.pretrain import PretrainConfig, ensure_base_model

    return ensure_base_model(PretrainConfig())


def load_model(path: Path, cfg: TrainConfig, device: torch.device):
    """(MTPCausalLM on `device` in the training dtype, tokenizer) from a checkpoint directory.

    Sharded runs keep float32 weights (the master copy; bfloat16 is then the compute dtype, `mtprl.train.fsdp`).
    """
    dtype = torch.float32 if cfg.parallel == "fsdp" else DTYPES[cfg.dtype]
    model = MTPCausalLM.from_pretrained(path, num_mtp_layers=cfg.num_mtp_layers, dtype=dtype)
    tokenizer = load_tokenizer(path)
    return model.to(device).eval(), tokenizer


def load_for_sharding(path: Path, cfg: TrainConfig, dist: Dist):
    """(model, tokenizer, full state) for `shard_model`: rank 0 loads the checkpoint (`load_model`), the other
    ranks build the same model on the meta device from rank 0's config (no weights read); the full state is
    rank 0's whole tensors ({} elsewhere), None with one process (the model is whole there anyway)."""
    from mtprl.train.fsdp import model_state_from_rank0

    if dist.world == 1:
        return (*load_model(path, cfg, dist.device), None)
    model, tokenizer = load_model(path, cfg, dist.device) if dist.is_main else (None, load_tokenizer(path))
    spec = dist.broadcast_object((model.config, model.num_mtp, model.layout) if dist.is_main else None)
    if not dist.is_main:
        from transformers import AutoModelForCausalLM

        config, num_mtp, layout = spec
        with torch.device("meta"):
            model = MTPCausalLM(AutoModelForCausalLM.from_config(config), num_mtp, layout=layout).to(torch.float32)
    return model.eval(), tokenizer, model_state_from_rank0(model)


def _accelerator(cfg: TrainConfig, run_dir: Path):
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    log_with = None if cfg.log_with == "none" else cfg.log_with
    return Accelerator(cpu=cpu, log_with=log_with, project_dir=str(run_dir))


def _check_world(cfg: TrainConfig, dist: Dist) -> None:
    """Every worker needs at least one prompt, one eval problem and one row of every mini-batch (sharded:
    the same number of rows)."""
    world = dist.world
    problem = check_sharded_run(cfg, world, dist.device) if dist.parallel == "fsdp" else None
    if problem:
        raise ConfigError(problem)
    rows = cfg.prompts_per_step * cfg.group_size // cfg.mini_batches
    for name, value in (("prompts_per_step", cfg.prompts_per_step), ("eval_limit", cfg.eval_limit),
                        ("rows per mini-batch (prompts_per_step × group_size / mini_batches)", rows)):
        if value < world:
            raise ConfigError(f"{name} is {value} but there are {world} workers; each needs at least one, so raise "
                              "it or launch fewer processes")


def check_inputs(cfg: TrainConfig) -> tuple[ProblemStream, RewardFn, dict]:
    """The cheap checks of everything a run reads, before anything expensive: the model directory (config,
    weight files whole) and the data (every row read and checked); returns the problems."""
    if cfg.model != TINY_DEFAULT:
        try:
            check_checkpoint_dir(cfg.model)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model: {err}") from None
    return build_problems(cfg)


def _announce(dist: Dist, run_dir: Path) -> None:
    """Say how the run was really launched (and loudly when the environment asked for something else)."""
    if not dist.is_main:
        return
    print(f"mtprl train: {describe_launch(dist)}; run directory {run_dir}", file=sys.stderr, flush=True)
    mismatch = launch_mismatch(dist.world)
    if mismatch:
        print(f"mtprl train: WARNING: {mismatch}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Run:
    """Everything one training run holds between steps."""

    cfg: TrainConfig
    run_dir: Path
    dist: Dist
    model: MTPCausalLM
    tokenizer: object
    ref_model: MTPCausalLM | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    stream: ProblemStream
    reward_fn: RewardFn
    suites: dict
    log: MetricsLog
    started: float  # perf_counter value that corresponds to time 0 of the run
    engine: object | None = None  # the colocated VLLMEngine of rollout_backend vllm (train/vllm_rollouts.py)

    def now(self) -> float:
        return time.perf_counter() - self.started

    def step(self, step: int) -> dict[str, float]:
        cfg, t0 = self.cfg, time.perf_counter()
        with gathered(self.model):  # sharded: every layer whole once, not per decoding step
            batch, metrics = collect_batch(self.model, self.tokenizer, self.stream, self.reward_fn, cfg, step,
                                           self.dist, self.engine)
        t1 = time.perf_counter()
        with gathered(self.model), gathered(self.ref_model):
            prepare_log_probs(self.model, self.ref_model, batch, cfg, step, self.dist)
        if self.engine is not None:  # the off-policy error of the vLLM engine against the trainer
            metrics.update(rollout_mismatch(batch.old_log_probs, batch.rollout_log_probs, batch.loss_mask))
        exact = cfg.exact_every > 0 and (step - 1) % cfg.exact_every == 0
        metrics.update(train_on_batch(self.model, self.optimizer, self.scheduler, batch, cfg, step, self.dist, exact))
        metrics.update({"time/rollout_s": t1 - t0, "time/update_s": time.perf_counter() - t1})
        if self.engine is not None:  # the next rollout samples from the updated weights, MTP layers included
            t2 = time.perf_counter()
            self.engine.sync(self.model, iter_full_state(self.model))  # whole tensors, one at a time if sharded
            metrics["time/weight_sync_s"] = time.perf_counter() - t2
        return self.log.log("train", step, self.now(), metrics)

    def evaluate(self, step: int) -> dict[str, float]:
        with gathered(self.model):
            values, per_problem = evaluate(self.model, self.tokenizer, self.suites, self.reward_fn, self.cfg, step,
                                           self.dist)
        if self.dist.is_main:
            write_problem_results(self.run_dir, step, per_problem)
        return self.log.log("eval", step, self.now(), values)

    def save(self, step: int) -> None:
        state = {"step": step, "data_position": self.stream.position, "elapsed": self.now(),
                 "config": config_to_dict(self.cfg)}
        save_checkpoint(self.run_dir / "checkpoints", step, model=self.model, tokenizer=self.tokenizer,
                        optimizer=self.optimizer, scheduler=self.scheduler, state=state, dist=self.dist,
                        keep=self.cfg.keep_checkpoints, export_dtype=DTYPES[self.cfg.dtype])


def _plan(cfg: TrainConfig, run_dir: Path, dist: Dist, lock: RunLock) -> StartPlan:
    """Rank 0 locks the run directory and decides how the run starts; every rank gets the plan."""
    plan = None
    if dist.is_main:
        lock.acquire()
        notes = [] if lock.stale is None else [f"the lock of pid {lock.stale.get('pid')} (which ended without "
                                               "releasing it) was taken over"]
        plan = plan_start(cfg, run_dir)
        print_notes(notes + plan.notes)
    return dist.broadcast_object(plan)


def _build_models(cfg: TrainConfig, dist: Dist, path: Path, base: Path):
    """(model from `path` with the regime applied, tokenizer, frozen reference model from `base` or None).
    Under `parallel: fsdp` both are sharded, rank 0 reading the weights and every rank getting its shards from
    it (`load_for_sharding`, `shard_model`); otherwise whole on every worker."""
    sharded = cfg.parallel == "fsdp"
    if sharded:
        ensure_process_group(dist.device)

    def build(source: Path, prepare):
        if sharded:
            model, tokenizer, full_state = load_for_sharding(source, cfg, dist)
        else:
            model, tokenizer = load_model(source, cfg, dist.device)
        prepare(model)
        if sharded:  # after `prepare`: the regime's detach switches and frozen parameters are set before sharding
            shard_model(model, dist.device, bf16_compute=cfg.dtype == "bfloat16", full_state=full_state)
        return model, tokenizer

    model, tokenizer = build(path, lambda m: apply_regime(m, cfg.regime))
    ref_model = build(base, lambda m: m.requires_grad_(False))[0] if cfg.kl_coef > 0 else None
    return model, tokenizer, ref_model


def _start(cfg: TrainConfig, lock: RunLock) -> tuple[Run, int]:
    """Check, lock, build (or restore) the run; returns it and the number of steps already done.

    Order: cheap checks (inputs, launch, run directory, checkpoint) → pre-training of the base if
    needed and model loading → the first write to the run directory (`commit_start`).
    """
    run_dir = Path(cfg.output_dir)
    stream, reward_fn, suites = check_inputs(cfg)
    accelerator = _accelerator(cfg, run_dir)
    dist = Dist(accelerator, cfg.parallel)
    _announce(dist, run_dir)
    _check_world(cfg, dist)
    plan = _plan(cfg, run_dir, dist, lock)
    world_problem = plan.resume_from and resume_world_problem(plan.resume_from, dist.world, cfg.rollout_rng)
    if world_problem:  # cfg.rollout_rng is the checkpoint's (plan_start refuses other result-affecting settings)
        raise CheckpointError(world_problem)
    cfg = dataclasses.replace(cfg, parallel=dist.parallel)  # an accelerate FSDP config selects it too
    whole = plan.resume_from is not None and not is_sharded_checkpoint(plan.resume_from)  # else DCP state below
    if whole and cfg.parallel == "fsdp":  # refused before anything expensive
        raise CheckpointError(f"checkpoint '{plan.resume_from}' was written by a data-parallel run (one "
                              "optimizer.pt), which a sharded run cannot load; resume it with parallel: ddp")
    base = base_model_path(cfg)
    torch.manual_seed(cfg.seed)  # fresh MTP layers of a checkpoint without them draw from it
    model, tokenizer, ref_model = _build_models(cfg, dist, plan.resume_from / "model" if whole else base, base)
    optimizer, scheduler = build_optimizer(model, cfg)
    done, elapsed = 0, 0.0
    if plan.resume_from is not None:
        state = load_trainer_state(plan.resume_from, optimizer, scheduler, dist, model=model)
        done, elapsed = int(state["step"]), float(state["elapsed"])
        stream.seek(int(state["data_position"]))
    if dist.is_main:
        commit_start(cfg, run_dir, plan)
    dist.barrier()
    if cfg.log_with != "none":
        accelerator.init_trackers(cfg.project, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                       for k, v in config_to_dict(cfg).items()})
    log = MetricsLog(run_dir / "metrics.jsonl", accelerator, enabled=dist.is_main)
    engine = None
    if cfg.rollout_backend == "vllm":
        from mtprl.train.vllm_rollouts import start_engine

        engine = start_engine(model, tokenizer, cfg, dist, run_dir)
    run = Run(cfg, run_dir, dist, model, tokenizer, ref_model, optimizer, scheduler, stream, reward_fn, suites, log,
              started=time.perf_counter() - elapsed, engine=engine)
    return run, done


def train(cfg: TrainConfig) -> Path:
    """Run `mtprl train` in-process and return the run directory (see the module docstring)."""
    cfg = checked(cfg)
    lock = RunLock(Path(cfg.output_dir))
    try:
        run, done = _start(cfg, lock)
        _loop(run, done)
        if run.engine is not None:  # last: vLLM's teardown ends the process group too (VLLMEngine.close)
            run.dist.barrier()
            run.engine.close()
    finally:
        lock.release()
        release_process_group()
    return run.run_dir


def _loop(run: Run, done: int) -> None:
    cfg = run.cfg
    if done >= cfg.steps and (run.run_dir / "summary.json").exists():
        run.log.close()
        return  # resumed a finished run: nothing left to do
    progress = Progress(cfg.steps, done, cfg.progress and run.dist.is_main)
    last_eval = None
    try:
        if done == 0 and cfg.eval_at_start and run.suites:
            with progress.phase("eval step 0"):
                run.evaluate(0)
        for step in range(done + 1, cfg.steps + 1):
            progress.update(run.step(step))
            if run.suites and cfg.eval_every > 0 and step % cfg.eval_every == 0:
                with progress.phase(f"eval step {step}"):
                    last_eval = (step, run.evaluate(step))
            if step == cfg.steps or (cfg.save_every > 0 and step % cfg.save_every == 0):
                run.save(step)
        if run.suites and (last_eval is None or last_eval[0] != cfg.steps):
            with progress.phase(f"eval step {cfg.steps}"):
                last_eval = (cfg.steps, run.evaluate(cfg.steps))
        if run.dist.is_main:
            summary = {"regime": cfg.regime, "seed": cfg.seed, "steps": cfg.steps, "wall_time": run.now(),
                       "world_size": run.dist.world,
                       "eval": {k: v for k, v in (last_eval[1] if last_eval else {}).items()
                                if k not in ("kind", "step", "time")}}
            (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    finally:
        progress.close()
        run.log.close()
