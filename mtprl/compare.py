"""`mtprl compare` and `mtprl demo`: every MTP regime side by side from the same base, then a report.

Each (regime, seed) pair is one `mtprl train` run in `OUTPUT_DIR/runs/REGIME-seedSEED`, with the
same settings apart from the regime. `arms` sweeps λ₀ per regime: REGIME at λ₀ ≠ mtp_coef runs in
`OUTPUT_DIR/runs/REGIME@λ₀-seedSEED` (at λ₀ = mtp_coef it is the plain REGIME run), and the report
labels every run of a swept regime REGIME@λ₀ (`mtprl.report.load.label_arms`). A finished run whose recorded config matches is re-used; an
unfinished one resumes from its latest checkpoint; one whose recorded config differs is an error
(nothing is overwritten). Runs go one after another in this process, or `workers` at a time in
child processes (each with its share of the CPU threads). The report goes to OUTPUT_DIR/report.
`mtprl demo` is the same experiment with a budget sized for a laptop CPU: one seed, ~15 minutes.

The base model is evaluated once per experiment, with the final evaluation's sizes, into
OUTPUT_DIR/base (`eval.json`: the metrics, the model's weights hash and the evaluation settings;
`evals/step-0.json`: per-problem results), and shared by every run as its step 0: the runs
themselves skip the step-0 evaluation (`eval_at_start: false`), and the report compares each
run's final evaluation with the base problem by problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mtprl.config import (
    ConfigError, add_config_arguments, build_config, config_to_dict, load_config, opt, read_yaml, require,
)

DEMO_REGIMES = ["frozen", "detach", "ce", "policy", "occ"]
# Shared `mtprl train` settings of the demo and of compare's default. The RL recipe (16 prompts × 8
# samples per step, 4 mini-batches of 32, lr 1e-4 without warm-up, DAPO dynamic sampling, 60 steps)
# was chosen on `detach` alone by the sweep in docs/recipe-sweep.md; the evaluation gives every suite
# 256 problems × 4 samples at T = 1 plus greedy at the end (64 problems in between). Sized so that the
# demo (five regimes, one seed, from the shipped base) fits in about 15 minutes on 2 CPU cores.
# `mtprl compare` with the demo's output dir re-uses the demo's seed-0 runs.
DEMO_SETTINGS = ["prompts_per_step=16", "group_size=8", "mini_batches=4", "lr=1e-4", "warmup_steps=0",
                 "dynamic_sampling=true", "max_new_tokens=96", "eval_every=20", "eval_limit=64",
                 "final_eval_limit=256", "eval_k=4", "eval_temperature=1.0", "exact_every=10", "save_every=20"]
# `mtprl train` settings compare sets itself, refused in train_config / --set: per run, or by its own options.
OWNED = {"regime": "set per run from --regimes", "seed": "set per run from --seeds",
         "output_dir": "set per run under --output-dir", "steps": "use compare's --steps",
         "mtp_coef": "use compare's --mtp-coef or --arms", "occ_estimator": "use compare's --occ-estimator",
         "resume": "compare resumes unfinished runs and re-uses finished ones",
         "overwrite": "compare restarts a run that saved no checkpoint (same settings, so nothing is lost)",
         "eval_at_start": "compare evaluates the shared base once, as every run's step 0"}


@dataclasses.dataclass
class CompareConfig:
    """Run MTP regimes side by side (same base, same settings, several seeds) and report."""

    regimes: list[str] = opt(DEMO_REGIMES, "regimes to run (any of mtprl.losses.MTP_REGIMES)")
    seeds: list[int] = opt([0, 1, 2, 3, 4], "seeds; each regime runs once per seed")
    steps: int = opt(60, "RL steps per run")
    mtp_coef: float = opt(0.1, "λ₀ for every regime not named in arms (fixed λ for ce/policy, the base of OCC's λ)")
    arms: list[str] = opt([], "λ₀ sweeps as REGIME:λ₀,λ₀,... (e.g. --arms occ:0.1,1,10 policy:0.1,1): every λ₀ is "
                              "its own arm, REGIME@λ₀ in tables and paired comparisons, against the same runs of the "
                              "other regimes at mtp_coef; an arm at λ₀ = mtp_coef re-uses the plain REGIME runs; a "
                              "regime named here and not in regimes is added")
    occ_estimator: str = opt("mean-ratio", "OCC proxy estimator: mean-ratio (paper) or ratio-of-sums")
    train_config: str | None = opt(None, "YAML file of `mtprl train` settings shared by every run")
    set: list[str] = opt([], "shared `mtprl train` settings as key=value; they win over train_config, which wins "
                             "over the built-in ones: " + " ".join(DEMO_SETTINGS) + "; the settings compare sets "
                             "itself (" + ", ".join(OWNED) + ") are refused")
    output_dir: str = opt("runs/compare", "experiment folder: runs/ and report/")
    workers: int = opt(2, "runs at a time (child processes sharing the CPU cores); 1: in this process")

    def validate(self) -> None:
        from mtprl.losses import MTP_REGIMES

        require(bool(self.regimes), "regimes must name at least one regime")
        for r in self.regimes:
            require(r in MTP_REGIMES, f"unknown regime '{r}' in regimes; valid: {', '.join(MTP_REGIMES)}")
        require(len(set(self.regimes)) == len(self.regimes), f"regimes repeat a name: {self.regimes}")
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds),
                f"seeds must be one or more distinct integers, got {self.seeds}")
        require(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        for r in parse_arms(self.arms):
            require(r in MTP_REGIMES, f"unknown regime '{r}' in arms; valid: {', '.join(MTP_REGIMES)}")
        if self.train_config is not None:
            require(Path(self.train_config).is_file(), f"train_config '{self.train_config}' does not exist")


@dataclasses.dataclass
class DemoConfig(CompareConfig):
    """The main job: the five regimes from the embedded base, one seed, sized for ~15 minutes on 2 CPU cores."""

    seeds: list[int] = opt([0], "seeds; each regime runs once per seed")
    output_dir: str = opt("runs/demo", "experiment folder: runs/ and report/")
    workers: int = opt(5, "runs at a time (child processes sharing the CPU cores): all five at once, so no core "
                          "idles while the last run finishes; 1: in this process")


def parse_arms(items: list[str]) -> dict[str, list[float]]:
    """{regime: [λ₀, ...]} from 'REGIME:λ₀,λ₀' items; a bare number continues the regime before it (so a
    YAML string 'occ:0.1,1' split at its commas reads the same)."""
    out: dict[str, list[float]] = {}
    current = None
    for token in " ".join(str(i) for i in items).replace(",", " ").split():
        regime, sep, value = token.rpartition(":")
        if sep:
            require(bool(regime) and regime not in out, f"arms: regime '{regime}' is empty or named twice in "
                                                        f"{items}; give each regime once as REGIME:λ₀,λ₀,...")
            current = regime
            out[current] = []
        require(current is not None, f"arms must start with REGIME:λ₀ (e.g. occ:0.1,1,10), got {items}")
        if not value:
            continue
        try:
            coef = float(value)
        except ValueError:
            raise ConfigError(f"arms: '{value}' in {items} is not a number (λ₀ values of regime '{current}')") from None
        require(coef not in out[current], f"arms: λ₀ = {value} is repeated for regime '{current}'")
        out[current].append(coef)
    for regime, coefs in out.items():
        require(bool(coefs), f"arms: regime '{regime}' has no λ₀ value; write {regime}:λ₀,λ₀,...")
    return out


def arm_name(regime: str, coef: float, default: float) -> str:
    """The name of a regime's run at λ₀ = `coef`: the regime itself at the default λ₀, else REGIME@λ₀."""
    return regime if coef == default else f"{regime}@{coef:g}"


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes key=value pairs, got '{item}'")
        out[key.strip()] = yaml.safe_load(value)
    return out


def plan_runs(cfg: CompareConfig) -> list[tuple[str, object]]:
    """(name, TrainConfig) for every regime × seed; every config is checked before anything runs."""
    from mtprl.train.config import TrainConfig

    given = read_yaml(cfg.train_config) if cfg.train_config else {}
    given.update(_parse_sets(cfg.set))
    owned = [f"{key} ({OWNED[key]})" for key in OWNED if key in given]
    if owned:
        raise ConfigError(f"train_config / --set may not hold the settings compare sets itself: {'; '.join(owned)}")
    shared = {**_parse_sets(DEMO_SETTINGS), **given}
    if cfg.workers > 1 and len(cfg.regimes) * len(cfg.seeds) > 1:
        shared.setdefault("progress", False)  # child processes log to train.log; a bar there only if asked for
    arms = parse_arms(cfg.arms)
    runs = []
    for regime in cfg.regimes + [r for r in arms if r not in cfg.regimes]:
        for coef in arms.get(regime, [cfg.mtp_coef]):
            for seed in cfg.seeds:
                name = f"{arm_name(regime, coef, cfg.mtp_coef)}-seed{seed}"
                values = {**shared, "regime": regime, "seed": seed, "steps": cfg.steps, "mtp_coef": coef,
                          "occ_estimator": cfg.occ_estimator, "resume": "auto", "overwrite": True,
                          "eval_at_start": False,
                          "output_dir": str(Path(cfg.output_dir) / "runs" / name)}
                runs.append((name, build_config(TrainConfig, values, f"the settings of run {name}")))
    return runs


def run_state(train_cfg) -> str:
    """'done' (finished with the same settings), 'partial' (resumable) or 'new'."""
    run_dir = Path(train_cfg.output_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return "new"
    from mtprl.train.config import result_differences

    recorded = yaml.safe_load(saved.read_text()) or {}
    diff = result_differences(recorded, train_cfg)
    if diff:
        raise ConfigError(f"run directory '{run_dir}' holds a run with other settings ({'; '.join(diff)}); use "
                          "another --output-dir or remove that run")
    return "done" if (run_dir / "summary.json").is_file() else "partial"


def _child_command(train_cfg, threads: int) -> tuple[list[str], dict]:
    run_dir = Path(train_cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    request = run_dir / "requested.yaml"
    request.write_text(yaml.safe_dump(config_to_dict(train_cfg), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return [sys.executable, "-m", "mtprl", "train", "--config", str(request)], env


def _last_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    for line in reversed(metrics.read_text().strip().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if row.get("kind") == "train":
            return int(row.get("step", 0))
    return 0


def run_parallel(todo: list[tuple[str, object]], workers: int) -> None:
    """Run the pending trainings `workers` at a time as child processes, printing progress."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    queue, running, failed = list(todo), {}, []
    while queue or running:
        while queue and len(running) < workers:
            name, tc = queue.pop(0)
            cmd, env = _child_command(tc, threads)
            log = open(Path(tc.output_dir) / "train.log", "a")
            running[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), tc, log)
            print(f"  started {name}", flush=True)
        time.sleep(5)
        status = []
        for name, (proc, tc, log) in list(running.items()):
            if proc.poll() is None:
                status.append(f"{name} {_last_step(Path(tc.output_dir))}/{tc.steps}")
                continue
            log.close()
            del running[name]
            if proc.returncode:
                failed.append(name)
                print(f"  FAILED {name} (exit {proc.returncode}); see {tc.output_dir}/train.log", flush=True)
            else:
                print(f"  finished {name}", flush=True)
        if status:
            print("  running: " + ", ".join(status), flush=True)
    if failed:
        raise RuntimeError(f"runs failed: {', '.join(failed)}; their logs are in their run directories, and "
                           "re-running the same command resumes them")


# TrainConfig fields that decide what the shared base evaluation measures.
_BASE_EVAL_FIELDS = ("model", "num_mtp_layers", "data", "eval_data", "eval_suites", "families", "chat_template",
                     "max_prompt_tokens", "max_new_tokens", "top_p", "top_k", "draft_tokens", "eval_k",
                     "eval_temperature", "eval_limit", "final_eval_limit", "dtype", "micro_batch_size",
                     "rollout_rng")


def evaluate_base(train_cfg, out_dir: Path) -> dict:
    """Evaluate the runs' starting model once (final sizes, seed 0) into out_dir; re-use a matching result."""
    from mtprl.pretrain.cache import weights_hash
    from mtprl.train.data import build_problems
    from mtprl.train.distributed import Dist
    from mtprl.train.evaluate import eval_size, evaluate, write_problem_results
    from mtprl.train.loop import base_model_path, load_model

    path = base_model_path(train_cfg)
    settings = {k: getattr(train_cfg, k) for k in _BASE_EVAL_FIELDS}
    record = {"model": str(path), "weights_hash": weights_hash(path), "settings": settings, "seed": 0}
    saved = out_dir / "eval.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        if {k: old.get(k) for k in ("weights_hash", "settings", "seed")} == {k: record[k] for k in
                                                                              ("weights_hash", "settings", "seed")}:
            return old
    start = time.perf_counter()
    eval_cfg = dataclasses.replace(train_cfg, seed=0)
    model, tokenizer = load_model(path, eval_cfg, Dist().device)
    _, reward_fn, suites = build_problems(eval_cfg)
    size = eval_size(eval_cfg, eval_cfg.steps)
    values, per_problem = evaluate(model, tokenizer, suites, reward_fn, eval_cfg, 0, Dist(), size=size)
    write_problem_results(out_dir, 0, per_problem)
    record.update(values=values, wall_time=time.perf_counter() - start)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, saved)
    return record


def run_compare(cfg: CompareConfig) -> dict:
    """Run (or re-use) every regime × seed, then build the report; returns the report summary."""
    from mtprl.report import build_report, format_summary_table
    from mtprl.train import train
    from mtprl.pretrain import PretrainConfig, ensure_base_model
    from mtprl.train.loop import check_inputs

    start = time.perf_counter()
    runs = plan_runs(cfg)
    states = {name: run_state(tc) for name, tc in runs}
    todo = [(name, tc) for name, tc in runs if states[name] != "done"]
    if todo:  # model directory and data: every run reads the same ones
        check_inputs(todo[0][1])
    print(f"{len(runs)} runs: {len(runs) - len(todo)} re-used, {len(todo)} to run "
          f"({', '.join(n for n, _ in todo) or 'none'})", flush=True)
    if todo and any(tc.model == "tiny-default" for _, tc in todo):
        ensure_base_model(PretrainConfig())  # pre-train (or find) the shared base once, before the runs
    out = Path(cfg.output_dir)
    base = evaluate_base(runs[0][1], out / "base")
    avg = {k: v for k, v in base["values"].items() if k.startswith("eval/avg/")}
    print(f"base model {base['model']} (weights hash {base['weights_hash']}): "
          + ", ".join(f"{k[9:]} {v:.3f} ± {base['values']['eval_se/avg/' + k[9:]]:.3f}" for k, v in avg.items()),
          flush=True)
    if cfg.workers > 1 and len(todo) > 1:
        run_parallel(todo, cfg.workers)
    else:
        for name, tc in todo:
            print(f"== {name}", flush=True)
            train(tc)
    summary = build_report([Path(tc.output_dir) for _, tc in runs], out / "report", base_dir=out / "base")
    print(format_summary_table(summary))
    print(f"report: {out / 'report' / 'report.md'}  (wall time {time.perf_counter() - start:.0f}s)")
    return summary


def add_arguments(parser: argparse.ArgumentParser, cls: type = CompareConfig) -> None:
    add_config_arguments(parser, cls)


def run(args: argparse.Namespace, cls: type = CompareConfig) -> int:
    cfg = load_config(cls, args)
    run_compare(cfg)
    return 0
