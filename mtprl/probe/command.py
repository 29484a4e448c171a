"""`mtprl probe RUN_DIR`: the finite-difference probe of λ at a run's checkpoints (`mtprl.probe.core`).

Writes RUN_DIR/probe/ (or --output-dir): `probe.jsonl` (one row per probed checkpoint and c; re-probing
a step with the same c replaces its row), `summary.json` and `report.md` (sign agreement and Spearman ρ
of every predictor with the measured dJ/dλ, bootstrap 95% intervals) and `probe.png`. `mtprl report`
reads RUN_DIR/probe/probe.jsonl for claim (5). Every setting is checked, and every chosen checkpoint
verified, before a model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from mtprl.config import ConfigError, add_config_arguments, build_config, load_config, opt, read_yaml, require


@dataclasses.dataclass
class ProbeConfig:
    """Measure the true effect of λ on the objective at a run's checkpoints and compare it with the predictors."""

    run_dir: str | None = opt(None, "the run directory (config.yaml, checkpoints/); the RUN_DIR argument wins")
    checkpoints: list[int] = opt([], "checkpoint steps to probe (each needs checkpoints/step-N); empty: all of them")
    coef: float = opt(1.0, "c: every head's λ is set to −c, 0 and +c in the three probe updates")
    prompts: int = opt(64, "fresh problems on which J (mean reward) is measured, >= 2 (they give the standard errors)")
    samples: int = opt(4, "responses sampled per problem for J")
    fresh_prompts: int = opt(16, "problems of the fresh rollout batch for ⟨g_fresh, P g_MTP⟩ (× the run's group "
                                 "size); 0: skip that predictor")
    estimator: str = opt("importance", "how J is measured with common random numbers: importance (responses sampled "
                                       "once before the update, each updated copy scored by π_λ/π₀) or resample "
                                       "(each copy samples with the same seed)")
    baseline: str = opt("none", "importance estimator's control variate: none (plain r · π_λ/π₀) or leave-one-out "
                                "(r centred on the mean reward of the problem's other responses; needs samples >= 2; "
                                "same mean; on the demo's checkpoints its standard error was 1.3e-5 against 1.1e-5 "
                                "(occ, step 20) and 5.0e-5 against 5.4e-5 (policy, step 40), so not a clear gain)")
    seed: int = opt(0, "seed of the fresh problems and of the sampling shared by the three updates")
    bootstrap: int = opt(2000, "bootstrap resamples of the agreement intervals")
    output_dir: str | None = opt(None, "where probe.jsonl, summary.json, report.md, probe.png go; null: RUN_DIR/probe")
    device: str = opt("cpu", "cpu or cuda")

    def validate(self) -> None:
        require(self.run_dir is not None, "no run directory given; pass RUN_DIR (a folder written by mtprl train)")
        run = Path(self.run_dir)
        require((run / "config.yaml").is_file(), f"'{run}' has no config.yaml, so it is not a run directory; pass "
                                                 "the folder mtprl train wrote")
        require(self.coef > 0, f"coef must be > 0 (the probe sets λ to −c, 0, +c), got {self.coef}")
        require(self.prompts >= 2, f"prompts must be >= 2 (the standard errors need two), got {self.prompts}")
        require(self.samples >= 1, f"samples must be >= 1, got {self.samples}")
        require(self.fresh_prompts >= 0, f"fresh_prompts must be >= 0, got {self.fresh_prompts}")
        require(self.bootstrap >= 0, f"bootstrap must be >= 0, got {self.bootstrap}")
        require(self.estimator in ("importance", "resample"),
                f"estimator must be importance or resample, got {self.estimator!r}")
        require(self.baseline in ("leave-one-out", "none"),
                f"baseline must be leave-one-out or none, got {self.baseline!r}")
        require(self.baseline == "none" or self.estimator != "importance" or self.samples >= 2,
                f"baseline leave-one-out needs samples >= 2 (the other responses of a problem), got samples = "
                f"{self.samples}; raise samples or pass --baseline none")
        require(self.device in ("cpu", "cuda"), f"device must be cpu or cuda, got {self.device!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("positional_run_dir", nargs="?", metavar="RUN_DIR", help="the run directory to probe")
    add_config_arguments(parser, ProbeConfig)


def _chosen(cfg: ProbeConfig, train_cfg) -> list[tuple[int, Path]]:
    """The checkpoints to probe, each verified; a clear error for a missing or damaged one."""
    from mtprl.losses import get_regime
    from mtprl.train.checkpoint import complete_checkpoints, verify_checkpoint

    if not get_regime(train_cfg.regime).has_term:
        raise ConfigError(f"the run's regime '{train_cfg.regime}' has no MTP term, so λ has no effect to probe")
    found = dict(complete_checkpoints(Path(cfg.run_dir) / "checkpoints"))
    if not found:
        raise ConfigError(f"'{cfg.run_dir}' has no complete checkpoint; train with save_every > 0 (checkpoints are "
                          "what the probe starts from)")
    missing = [s for s in cfg.checkpoints if s not in found]
    if missing:
        raise ConfigError(f"no checkpoint at step(s) {missing} in '{cfg.run_dir}'; available: {sorted(found)}")
    chosen = [(s, found[s]) for s in (cfg.checkpoints or sorted(found))]
    for _, path in chosen:
        verify_checkpoint(path)
    return chosen


def run(args: argparse.Namespace) -> int:
    overrides = {"run_dir": args.positional_run_dir} if args.positional_run_dir else {}
    cfg = load_config(ProbeConfig, args, **overrides)
    from mtprl.train.config import TrainConfig

    recorded = read_yaml(Path(cfg.run_dir) / "config.yaml")
    train_cfg = build_config(TrainConfig, {**recorded, "resume": "none"}, f"{cfg.run_dir}/config.yaml")
    chosen = _chosen(cfg, train_cfg)
    import torch

    from mtprl.probe.core import load_state, probe_checkpoint, write_rows
    from mtprl.report.probe import PROBE_FILE, agreement, agreement_table, probe_figure
    from mtprl.train.distributed import Dist

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but torch sees no CUDA device; use --device cpu")
    dist = Dist()
    dist.device = torch.device(cfg.device)
    out = Path(cfg.output_dir) if cfg.output_dir else Path(cfg.run_dir) / "probe"
    rows, start = [], time.perf_counter()
    for step, path in chosen:
        loaded = load_state(train_cfg, path, dist)
        row = probe_checkpoint(loaded, cfg.coef, cfg.prompts, cfg.samples, cfg.seed, cfg.fresh_prompts, dist,
                               cfg.estimator, cfg.baseline)
        rows.append(row)
        all_rows = write_rows(out / PROBE_FILE, rows)
        print(f"step {step}: J(−c, 0, +c) = {row['J_minus']:.4f}, {row['J_zero']:.4f}, {row['J_plus']:.4f}; "
              f"dJ/dλ = {row['dJ_dlambda']:+.4g} ± {row['dJ_dlambda_se']:.2g}, curvature {row['curvature']:+.3g} ± "
              f"{row['curvature_se']:.2g}; proxy ĉ {row['proxy_mean_ratio']:+.3g}, held-out ⟨g_RL, P g_MTP⟩ "
              f"{row['heldout_pdot'] if row['heldout_pdot'] is None else format(row['heldout_pdot'], '+.3g')} "
              f"({row['time/total_s']:.1f} s)", flush=True)
    stats = agreement(all_rows, resamples=cfg.bootstrap, seed=cfg.seed)
    fig = probe_figure(all_rows)
    drawn = fig is not None
    if drawn:
        fig.savefig(out / "probe.png", dpi=110)
    summary = {"run_dir": cfg.run_dir, "rows": len(all_rows), "agreement": stats,
               "wall_time_s": time.perf_counter() - start, "probe_config": dataclasses.asdict(cfg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = agreement_table(stats)
    how = cfg.estimator + (f", baseline {cfg.baseline}" if cfg.estimator == "importance" else "")
    (out / "report.md").write_text(f"# Finite-difference probe of {cfg.run_dir}\n\n{len(all_rows)} probed "
                                   f"checkpoint(s), c = {cfg.coef}, {cfg.prompts} problems × {cfg.samples} samples "
                                   f"per J ({how}).\n\n{table}\n" + ("\n![probe](probe.png)\n" if drawn else ""))
    print(table)
    print(f"probe written to {out} (wall time {summary['wall_time_s']:.0f} s)")
    return 0
