"""The finite-difference probe: the true effect of λ on the objective at a run's checkpoints.

At checkpoint step s of a run (its config.yaml settings, model, optimiser, scheduler and data position):
1. collect the run's own next rollout batch (step s + 1: same prompts and sampling seeds as the run) and
   take that step's updates under the run's regime up to, not including, the last one: the state at
   which the trainer measures the exact and held-out terms;
2. there, measure the predictors: OCC's proxy ĉ of the last mini-batch (both estimators), the same-batch
   exact slope (`exact_terms`), the held-out terms (`heldout_terms`) and ⟨g_fresh, P g_MTP⟩ with g_RL
   from a fresh rollout batch (`fresh_prompts` new problems × the run's group size);
3. for λ ∈ {−c, 0, +c}: on a copy of model, optimiser and scheduler, the real last update (the run's
   regime code path: `minibatch_update`, clipping and AdamW) with every head's λ forced to that value
   (the regime's own head loss and detach switches, its coefficient rule replaced by a fixed λ), then
   J = mean reward on `prompts` fresh problems × `samples` responses, with common random numbers:
   - "importance" (default): the responses are sampled once at the probed state θ₀ and every copy θ_λ
     is scored on the same ones, J(θ_λ) ≈ mean r·π_λ(y)/π₀(y) (sequence probabilities at the sampling
     temperature; top-p/top-k truncation is ignored). Unbiased for each λ, and the three estimates share
     their samples, so J₊ − J₋ has a small variance even when one update changes few sampled tokens.
     `baseline: leave-one-out` centres r on the mean reward of the problem's other responses: each J stays
     unbiased and problems whose responses all score the same add no noise, but wrong responses then add
     theirs (on the demo's checkpoints it did not lower the standard error clearly; see the option's help).
   - "resample": each copy samples its own responses with the same problems and the same generator
     seed. One small update rarely flips a sampled token, so J₊ − J₋ is often exactly 0 unless c is large.
4. dJ/dλ ≈ (J₊ − J₋) / 2c and the curvature (J₊ − 2J₀ + J₋) / c², each with the standard error of its
   per-prompt values (the prompts are the independent units).
Nothing of the run is modified: the copies are built fresh and the global RNG state is restored.
All sampling here uses mtprl's own engine: for a run with `rollout_backend: vllm` the step-(s + 1)
batch is therefore not the run's own (another sampler), only one like it from the same state.
A regime without an MTP term (frozen) has no λ to perturb and is refused.

Cost per checkpoint (the tiny default, one thread; measured figures in README): one rollout batch of
the run and one fresh one, mini_batches − 1 + 3 updates, the held-out terms (a forward and K + 1
gradient calls over the whole batch), the same-batch terms, and 3 × `prompts` × `samples` sampled
responses for J.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mtprl.losses import fixed_coefficient, get_regime
from mtprl.losses.heldout import grad_dot
from mtprl.model import apply_regime
from mtprl.train.batch import TrainBatch, derive_seed, response_log_probs
from mtprl.train.checkpoint import load_trainer_state, rng_state, set_rng_state
from mtprl.train.data import RewardFn, build_problems, encode_prompts
from mtprl.train.distributed import Dist
from mtprl.train.exact import exact_terms, half_gradients, heldout_terms, proxy_of_rows
from mtprl.train.loop import base_model_path, load_model
from mtprl.train.rollouts import collect_batch, generate_shared, sampling_params
from mtprl.train.update import build_optimizer, minibatch_update, prepare_log_probs, update_plan

Measure = Callable[[Any], list[float]]


def forced_lambda(cfg, lam: float, num_heads: int):
    """`cfg` with its regime's coefficient rule replaced by a fixed λ = `lam` for every head (same head loss,
    same detach switches, no exact slopes): the update of the run's regime at that λ."""
    spec = get_regime(cfg.regime)
    if not spec.has_term:
        raise ValueError(f"regime {spec.name!r} has no MTP term, so λ has no effect to probe")
    record = dataclasses.replace(spec, name=f"{spec.name}@λ={lam:g}", coefficient=fixed_coefficient,
                                 needs_exact_slopes=False, uses_drift=False)
    return dataclasses.replace(cfg, regime=record, mtp_coef=lam * num_heads)  # fixed rule: λ_k = λ₀ / K


def copy_state(model, optimizer, scheduler, cfg):
    """A new model, optimiser and scheduler equal to the given ones (these are only read)."""
    clone = copy.deepcopy(model)
    opt, sched = build_optimizer(clone, cfg)
    opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    sched.load_state_dict(copy.deepcopy(scheduler.state_dict()))
    return clone, opt, sched


def probe_updates(model, optimizer, scheduler, batch: TrainBatch, rows, cfg, dist: Dist, lambdas: list[float],
                  measure: Measure) -> list[dict[str, Any]]:
    """For each λ: the update on `rows` with λ forced, on a copy of the state, then `measure(updated copy)`.

    Returns per λ {"lambda", "metrics" (the update's), "values" (measure's)}. The given model, optimiser,
    scheduler and the global RNG state are left exactly as they were.
    """
    saved_rng = rng_state()
    out = []
    try:
        for lam in lambdas:
            clone, opt, sched = copy_state(model, optimizer, scheduler, cfg)
            metrics = minibatch_update(clone, opt, sched, batch, rows, forced_lambda(cfg, lam, model.num_mtp), dist)
            out.append({"lambda": lam, "metrics": metrics, "values": measure(clone)})
            del clone, opt, sched
    finally:
        set_rng_state(saved_rng)
    return out


def rewards_per_prompt(model, tokenizer, problems, reward_fn: RewardFn, cfg, samples: int, seed: int,
                       dist: Dist) -> list[float]:
    """Mean reward of `samples` responses to each problem (sampling generator seeded by `seed`)."""
    prompts = encode_prompts(tokenizer, problems, cfg.chat_template, cfg.max_prompt_tokens)
    params = sampling_params(cfg, samples, cfg.temperature)
    rollout, texts, share = generate_shared(model, tokenizer, prompts, params, seed, dist)
    local = problems[share]
    totals = [0.0] * len(local)
    for i, text in zip(rollout.prompt_index.tolist(), texts):
        totals[int(i)] += reward_fn(local[int(i)], text)
    return [t / samples for t in totals]


@dataclasses.dataclass
class Fresh:
    """Responses sampled once at the probed state, to score every updated copy by importance weights."""

    batch: TrainBatch  # the responses (advantages 0)
    rewards: torch.Tensor  # [N] task rewards
    prompt_index: torch.Tensor  # [N] which problem each row answers
    log_prob: torch.Tensor  # [N] sequence log-prob at the state they were sampled from
    prompts: int


@torch.no_grad()
def sequence_log_probs(model, batch: TrainBatch, cfg) -> torch.Tensor:
    """Σ_t log π(y_t | ·) over each row's response tokens [N], at the sampling temperature, in micro-batches."""
    out = []
    for rows in torch.arange(batch.size, device=batch.input_ids.device).split(cfg.micro_batch_size):
        mb = batch.select(rows)
        lp = response_log_probs(model, mb, cfg.temperature, mtp=False)
        out.append(torch.where(mb.loss_mask, lp.log_probs.double(), 0.0).sum(1))  # [B]
    return torch.cat(out)


def sample_fresh(model, tokenizer, problems, reward_fn: RewardFn, cfg, samples: int, seed: int, dist: Dist) -> Fresh:
    """`samples` responses to each problem at the model's current state, scored, with their log-probs."""
    prompts = encode_prompts(tokenizer, problems, cfg.chat_template, cfg.max_prompt_tokens)
    rollout, texts, share = generate_shared(model, tokenizer, prompts, sampling_params(cfg, samples, cfg.temperature),
                                            seed, dist)
    local = problems[share]
    rewards = torch.tensor([reward_fn(local[int(i)], t) for i, t in zip(rollout.prompt_index.tolist(), texts)],
                           dtype=torch.float64)
    batch = TrainBatch.build(torch.cat([rollout.prompt_ids, rollout.response_ids], 1),
                             torch.cat([rollout.prompt_mask.bool(), rollout.response_mask.bool()], 1),
                             rollout.response_mask.bool(), torch.zeros(len(texts)), model.num_mtp)
    return Fresh(batch, rewards, rollout.prompt_index.cpu(), sequence_log_probs(model, batch, cfg).cpu(), len(local))


BASELINES = ("none", "leave-one-out")


def importance_rewards(model, fresh: Fresh, cfg, baseline: str = "none") -> list[float]:
    """Per problem, an unbiased estimate of the updated model's expected reward from the responses of the
    probed state (the same responses for every copy), with w = π_model(y) / π_0(y):
    - "none": mean of r · w over the problem's responses;
    - "leave-one-out": mean of (r − b) · w + b, b the mean reward of the problem's *other* responses. b is
      independent of the response it is paired with and E₀[w] = 1, so the mean is unchanged, while a problem
      whose responses all score the same contributes exactly its reward to every copy: the differences
      between copies then come only from problems with mixed rewards (the control variate of GRPO's baseline).
    """
    weights = (sequence_log_probs(model, fresh.batch, cfg).cpu() - fresh.log_prob).exp()
    index, rewards = fresh.prompt_index, fresh.rewards
    counts = torch.zeros(fresh.prompts, dtype=torch.float64).index_add_(0, index, torch.ones_like(weights))
    if baseline == "none":
        terms = rewards * weights
    elif baseline == "leave-one-out":
        if bool((counts[index] < 2).any()):
            raise ValueError("a leave-one-out baseline needs >= 2 responses per problem; sample more or use 'none'")
        sums = torch.zeros(fresh.prompts, dtype=torch.float64).index_add_(0, index, rewards)
        others = (sums[index] - rewards) / (counts[index] - 1)
        terms = (rewards - others) * weights + others
    else:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    totals = torch.zeros(fresh.prompts, dtype=torch.float64).index_add_(0, index, terms)
    return (totals / counts.clamp(min=1)).tolist()


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var / n)


def finite_differences(j_minus: list[float], j_zero: list[float], j_plus: list[float], c: float) -> dict[str, float]:
    """dJ/dλ and the curvature at λ = 0 from per-prompt J at λ = −c, 0, +c, with per-prompt standard errors."""
    slope = [(p - m) / (2 * c) for m, p in zip(j_minus, j_plus)]
    curv = [(p - 2 * z + m) / (c * c) for m, z, p in zip(j_minus, j_zero, j_plus)]
    (d, d_se), (h, h_se) = mean_se(slope), mean_se(curv)
    return {"J_minus": mean_se(j_minus)[0], "J_zero": mean_se(j_zero)[0], "J_plus": mean_se(j_plus)[0],
            "dJ_dlambda": d, "dJ_dlambda_se": d_se, "curvature": h, "curvature_se": h_se}


@dataclasses.dataclass
class Loaded:
    """A run's training state at one checkpoint, as `mtprl train --resume` would restore it."""

    cfg: Any
    model: Any
    tokenizer: Any
    ref_model: Any
    optimizer: Any
    scheduler: Any
    stream: Any
    reward_fn: RewardFn
    step: int


def load_state(cfg, checkpoint: Path, dist: Dist) -> Loaded:
    """Model (regime applied), optimiser, scheduler and data stream of `checkpoint` (RNG state restored by the caller)."""
    model, tokenizer = load_model(checkpoint / "model", cfg, dist.device)
    apply_regime(model, cfg.regime)
    ref_model = load_model(base_model_path(cfg), cfg, dist.device)[0].requires_grad_(False) if cfg.kl_coef > 0 else None
    optimizer, scheduler = build_optimizer(model, cfg)
    state = load_trainer_state(checkpoint, optimizer, scheduler, dist, model=model)  # a sharded checkpoint loads here
    stream, reward_fn, _ = build_problems(cfg)
    stream.seek(int(state["data_position"]))
    return Loaded(cfg, model, tokenizer, ref_model, optimizer, scheduler, stream, reward_fn, int(state["step"]))


def _fresh_gradient_term(run: Loaded, keep: dict, probe_seed: int, fresh_prompts: int, dist: Dist) -> float | None:
    """Σ_k ⟨g_fresh, P g_k⟩: g_RL from a fresh rollout batch at the current parameters, g_k the run batch's."""
    if keep.get("precond") is None or not keep.get("mtp"):
        return None
    cfg = dataclasses.replace(run.cfg, seed=derive_seed("probe-fresh", run.cfg.seed, probe_seed),
                              prompts_per_step=fresh_prompts)
    stream = build_problems(cfg)[0]
    step = run.step + 1
    fresh, _ = collect_batch(run.model, run.tokenizer, stream, run.reward_fn, cfg, step, dist)
    prepare_log_probs(run.model, None, fresh, cfg, step, dist)
    g_fresh, _, _ = half_gradients(run.model, fresh, torch.arange(fresh.size), cfg, dist)
    return sum(float(grad_dot(g_fresh, g_k, keep["precond"])) for g_k in keep["mtp"])


ESTIMATORS = ("importance", "resample")


def probe_checkpoint(run: Loaded, c: float, prompts: int, samples: int, probe_seed: int, fresh_prompts: int,
                     dist: Dist, estimator: str = "importance", baseline: str = "none") -> dict[str, Any]:
    """One probe row for the loaded state (module docstring); timings in `time/*`."""
    cfg, step, times = run.cfg, run.step + 1, {}
    start = time.perf_counter()
    batch, _ = collect_batch(run.model, run.tokenizer, run.stream, run.reward_fn, cfg, step, dist)
    prepare_log_probs(run.model, run.ref_model, batch, cfg, step, dist)
    plan = update_plan(batch.size, cfg, step)
    for rows, last in plan[:-1]:
        minibatch_update(run.model, run.optimizer, run.scheduler, batch, rows, cfg, dist)
    last_rows = plan[-1][0]
    times["time/run_step_s"] = time.perf_counter() - start
    start = time.perf_counter()
    K = run.model.num_mtp
    proxies = proxy_of_rows(run.model, batch, last_rows, cfg, dist)
    same = exact_terms(run.model, batch, last_rows, cfg, dist)
    keep: dict = {}
    held = heldout_terms(run.model, run.optimizer, batch, cfg, step, dist, keep=keep)
    times["time/terms_s"] = time.perf_counter() - start
    start = time.perf_counter()
    fresh = _fresh_gradient_term(run, keep, probe_seed, fresh_prompts, dist)
    times["time/fresh_s"] = time.perf_counter() - start
    start = time.perf_counter()
    problems = build_problems(dataclasses.replace(cfg, seed=derive_seed("probe-j", cfg.seed, probe_seed, step)))[0]
    problems = problems.take(prompts)
    sample_seed = derive_seed("probe-sampling", cfg.seed, probe_seed, step)
    if estimator == "importance":
        sampled = sample_fresh(run.model, run.tokenizer, problems, run.reward_fn, cfg, samples, sample_seed, dist)

        def measure(model) -> list[float]:
            return importance_rewards(model, sampled, cfg, baseline)
    else:
        def measure(model) -> list[float]:
            return rewards_per_prompt(model, run.tokenizer, problems, run.reward_fn, cfg, samples, sample_seed, dist)

    arms = probe_updates(run.model, run.optimizer, run.scheduler, batch, last_rows, cfg, dist, [-c, 0.0, c], measure)
    times["time/arms_s"] = time.perf_counter() - start

    def head_sum(key: str) -> float | None:
        values = [held.get(f"heldout/{k}/{key}") for k in range(K)]
        return None if any(v is None for v in values) else sum(values)

    row = {"step": run.step, "c": c, "prompts": prompts, "samples": samples, "seed": probe_seed, "estimator": estimator,
           "baseline": baseline if estimator == "importance" else None,
           "regime": get_regime(cfg.regime).name, "mtp_coef": cfg.mtp_coef,
           **finite_differences(arms[0]["values"], arms[1]["values"], arms[2]["values"], c),
           "lambda_used": [[a["metrics"][f"mtp/{k}/lambda"] for k in range(K)] for a in arms],
           "proxy_mean_ratio": sum(p["proxy_mean_ratio"] for p in proxies) / K,
           "proxy_ratio_of_sums": sum(p["proxy_ratio_of_sums"] for p in proxies) / K,
           "exact_slope": sum(same[f"exact/{k}/slope"] for k in range(K)) / K,
           "heldout_dot": head_sum("dot"), "heldout_pdot": head_sum("pdot"), "same_pdot": head_sum("same_pdot"),
           "heldout_lambda_star": head_sum("lambda_star"), "fresh_pdot": fresh, **times}
    row["time/total_s"] = sum(times.values())
    return row


def write_rows(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge `rows` into the JSONL file at `path` (a row of the same step and c is replaced); all rows, by step."""
    old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    new_keys = {(r["step"], r["c"]) for r in rows}
    merged = sorted([r for r in old if (r.get("step"), r.get("c")) not in new_keys] + rows,
                    key=lambda r: (r["step"], r["c"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in merged))
    tmp.replace(path)
    return merged
