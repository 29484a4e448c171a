"""One step's rollout batch: prompts → responses → rewards → (dynamic sampling) → advantages.

Each draw takes `prompts_per_step` problems from the stream; the workers split them (contiguous
shares), sample `group_size` responses per prompt, score them with the task, and gather everything
on every worker. The random numbers (`rollout_rng`): `batch` (the default) draws each worker's share
from one generator seeded by (seed, step, draw, rank), so a run is reproducible and every regime with
the same seed sees the same first rollout, but the responses depend on how the prompts are split over
the workers; `prompt` gives every prompt group a generator of its own seeded by (seed, step, draw, the
prompt's index in the draw), so a prompt's responses are the same on any number of workers and a run
can resume on another process count (up to float rounding, which differs with the batch's padding and
could in principle flip a sampled token).

DAPO options. Overlong shaping subtracts min(1, (len − (L_max − buffer)) / buffer) · penalty from
the reward of responses longer than L_max − buffer. Dynamic sampling keeps only groups whose
(shaped) rewards are not all equal (the others have zero advantage everywhere) and draws more
prompts until `prompts_per_step` groups are kept or `max_draws` draws are used; a batch still
short is filled with dropped groups in draw order, so its size, and the mini-batch layout, never
change. The option `first_draws` = k > 1 samples the first k draws as one batch of the engine
(cheaper per sample; other tokens than k draws one after another, and k draws' problems used up
even when fewer would do). `reward/mean` and `acc` are measured on the first draw, an unbiased
sample of the policy on fresh training problems (the kept batch is biased towards mixed groups).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from mtprl.losses import group_advantages
from mtprl.rollout import PromptGenerators, SamplingParams, generate
from mtprl.train.batch import TrainBatch, derive_seed
from mtprl.train.data import ProblemStream, RewardFn, encode_prompts
from mtprl.train.distributed import Dist


@dataclasses.dataclass
class Draw:
    """Responses of one draw, gathered from all workers (N = prompts × group_size rows, prompt-major)."""

    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P] bool
    response_ids: Tensor  # [N, R] right-padded
    response_mask: Tensor  # [N, R] bool
    rewards: Tensor  # [N] shaped rewards
    correct: Tensor  # [N] raw reward == 1
    truncated: Tensor  # [N] bool, stopped by max_new_tokens
    metrics: dict[str, float]
    log_probs: Tensor | None = None  # [N, R] the sampler's log-probs of the response tokens, 0 elsewhere

    def rows(self, idx: Tensor) -> "Draw":
        return Draw(self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.response_mask[idx],
                    self.rewards[idx], self.correct[idx], self.truncated[idx], self.metrics,
                    None if self.log_probs is None else self.log_probs[idx])


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int, penalty: float) -> Tensor:
    """DAPO's soft overlong punishment [N] (<= 0) for response lengths [N]; zeros when buffer is 0."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    exceed = (lengths.float() - (max_new_tokens - buffer)).clamp(min=0)  # tokens into the buffer
    return -(exceed / buffer).clamp(max=1.0) * penalty


def sampling_params(cfg, n: int, temperature: float) -> SamplingParams:
    return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k, n=n, draft_tokens=cfg.draft_tokens)


ROLLOUT_RNGS = ("batch", "prompt")


def rollout_generator(seed: int, share: slice, n: int, rng: str, dist: Dist, device):
    """The random numbers of this worker's share of a call's prompts (module docstring): `batch`, one generator
    seeded by (seed, rank); `prompt`, one per prompt seeded by (seed, its index among all the call's prompts)."""
    if rng == "prompt":
        return PromptGenerators([derive_seed(seed, "prompt", i) for i in range(share.start, share.stop)], n, device)
    if rng != "batch":
        raise ValueError(f"rollout_rng must be one of {', '.join(ROLLOUT_RNGS)}, got {rng!r}")
    return torch.Generator(device=device).manual_seed(derive_seed(seed, dist.rank))


def generate_shared(model, tokenizer, prompts: list[list[int]], params: SamplingParams, seed: int, dist: Dist,
                    engine=None, rng: str = "batch"):
    """This worker's share of `prompts` sampled (our engine, or `engine`: a `VLLMEngine`), decoded;
    returns (rollout, texts, share). `rng`: `batch` or `prompt` (`rollout_generator`; ours only)."""
    share = dist.share(len(prompts))
    local = prompts[share]
    if engine is not None:
        if rng != "batch":
            raise ValueError("the vLLM engine seeds each request itself; sample with rng='batch'")
        rollout = engine.generate(local, params, tokenizer.eos_token_id, seed=derive_seed(seed, dist.rank))
        rollout = _to_device(rollout, model.device)
    else:
        generator = rollout_generator(seed, share, params.n, rng, dist, model.device)
        model.eval()
        rollout = generate(model, local, params, eos_token_id=tokenizer.eos_token_id, generator=generator)
    texts = [tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True)
             for ids, n in zip(rollout.response_ids, rollout.lengths.tolist())]
    return rollout, texts, share


def _to_device(rollout, device):
    return dataclasses.replace(rollout, **{f.name: getattr(rollout, f.name).to(device)
                                           for f in dataclasses.fields(rollout)
                                           if isinstance(getattr(rollout, f.name), Tensor)})


def sample_draw(model, tokenizer, problems, reward_fn: RewardFn, cfg, seed: int, dist: Dist, engine=None) -> Draw:
    """Sample, score and gather one draw of `problems` (group_size responses each)."""
    prompts = encode_prompts(tokenizer, problems, cfg.chat_template, cfg.max_prompt_tokens)
    rollout, texts, share = generate_shared(model, tokenizer, prompts, sampling_params(cfg, cfg.group_size,
                                                                                      cfg.temperature), seed, dist,
                                            engine, cfg.rollout_rng)
    local_problems = [problems[share][int(i)] for i in rollout.prompt_index]
    raw = torch.tensor([reward_fn(p, t) for p, t in zip(local_problems, texts)], dtype=torch.float32)
    lengths = rollout.lengths.cpu()
    shaped = raw + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
    truncated = torch.tensor([r == "length" for r in rollout.finish_reasons], dtype=torch.bool)
    device = model.device
    return Draw(
        prompt_ids=dist.gather_rows(rollout.prompt_ids, tokenizer.pad_token_id or 0, pad_left=True),
        prompt_mask=dist.gather_rows(rollout.prompt_mask.bool(), False, pad_left=True),
        response_ids=dist.gather_rows(rollout.response_ids, tokenizer.pad_token_id or 0),
        response_mask=dist.gather_rows(rollout.response_mask.bool(), False),
        rewards=dist.gather_rows(shaped.to(device)), correct=dist.gather_rows((raw >= 1.0).to(device)),
        truncated=dist.gather_rows(truncated.to(device)),
        metrics=dist.mean_values({k: float(v) for k, v in rollout.metrics.items()}),
        log_probs=dist.gather_rows(rollout.log_probs.float(), 0.0) if keep_log_probs(cfg) else None,
    )


def keep_log_probs(cfg) -> bool:
    """Whether the sampler's log-probs are kept (and gathered): only for what reads them, reusing them as the
    old log-probs or, with the vLLM backend, measuring and correcting its off-policy error."""
    return bool(getattr(cfg, "reuse_rollout_log_probs", False)) or getattr(cfg, "rollout_backend", "ours") == "vllm"


def _pad_cat(parts: list[Tensor], value, left: bool) -> Tensor:
    width = max(p.shape[1] for p in parts)
    out = []
    for p in parts:
        pad = p.new_full((p.shape[0], width - p.shape[1]), value)
        out.append(torch.cat([pad, p] if left else [p, pad], dim=1))
    return torch.cat(out)


def _concat(draws: list[Draw], pad_id: int) -> Draw:
    return Draw(
        prompt_ids=_pad_cat([d.prompt_ids for d in draws], pad_id, left=True),
        prompt_mask=_pad_cat([d.prompt_mask for d in draws], False, left=True),
        response_ids=_pad_cat([d.response_ids for d in draws], pad_id, left=False),
        response_mask=_pad_cat([d.response_mask for d in draws], False, left=False),
        rewards=torch.cat([d.rewards for d in draws]), correct=torch.cat([d.correct for d in draws]),
        truncated=torch.cat([d.truncated for d in draws]), metrics=draws[0].metrics,
        log_probs=None if any(d.log_probs is None for d in draws) else _pad_cat([d.log_probs for d in draws], 0.0,
                                                                                  left=False),
    )


def mixed_groups(rewards: Tensor, group_size: int) -> list[bool]:
    """Per group of `rewards [G * n]`: do its rewards differ (is its advantage non-zero somewhere)?"""
    grouped = rewards.reshape(-1, group_size)  # [G, n]
    return (grouped.max(1).values > grouped.min(1).values).tolist()


def select_groups(draw_rewards: list[Tensor], group_size: int, wanted: int, dynamic: bool) -> list[tuple[int, int]]:
    """(draw, group) pairs forming the batch: mixed-reward groups first (all groups without dynamic
    sampling), then dropped ones in draw order if fewer than `wanted` were kept."""
    kept, dropped = [], []
    for d, rewards in enumerate(draw_rewards):
        for g, is_mixed in enumerate(mixed_groups(rewards, group_size)):
            (kept if is_mixed or not dynamic else dropped).append((d, g))
    return (kept + dropped)[:wanted]


def collect_batch(model, tokenizer, stream: ProblemStream, reward_fn: RewardFn, cfg, step: int,
                  dist: Dist, engine=None) -> tuple[TrainBatch, dict[str, float]]:
    """The rollout batch of training step `step` (advantages set, log-probs not yet) and its metrics;
    sampled by `engine` (a `VLLMEngine`) when given, else by our engine."""
    n, draws = cfg.group_size, []
    max_draws, first = (cfg.max_draws, getattr(cfg, "first_draws", 1)) if cfg.dynamic_sampling else (1, 1)
    while len(draws) < max_draws:
        k = first if not draws else 1  # draws sampled together in this batch of the engine
        problems = stream.take(cfg.prompts_per_step * k)
        seed = derive_seed("rollout", cfg.seed, step, len(draws))
        sampled = sample_draw(model, tokenizer, problems, reward_fn, cfg, seed, dist, engine)
        rows = cfg.prompts_per_step * n  # prompt-major: draw j is rows j*rows .. (j+1)*rows - 1
        draws.extend([sampled] if k == 1 else
                     [sampled.rows(torch.arange(j * rows, (j + 1) * rows, device=sampled.rewards.device))
                      for j in range(k)])
        if sum(sum(mixed_groups(x.rewards, n)) for x in draws) >= cfg.prompts_per_step:
            break
    chosen = select_groups([x.rewards for x in draws], n, cfg.prompts_per_step, cfg.dynamic_sampling)
    starts = [0]
    for x in draws:
        starts.append(starts[-1] + x.rewards.numel())
    index = torch.cat([torch.arange(n) + starts[d] + g * n for d, g in chosen])
    batch = _concat(draws, tokenizer.pad_token_id or 0).rows(index.to(draws[0].rewards.device))
    advantages = group_advantages(batch.rewards, n, scale=cfg.adv_scale)
    train_batch = TrainBatch.build(torch.cat([batch.prompt_ids, batch.response_ids], 1),
                                   torch.cat([batch.prompt_mask, batch.response_mask], 1), batch.response_mask,
                                   advantages, model.num_mtp)
    train_batch.rollout_log_probs = batch.log_probs
    return train_batch, _metrics(draws, batch, cfg)


def _metrics(draws: list[Draw], batch: Draw, cfg) -> dict[str, float]:
    first = draws[0]
    lengths = first.response_mask.sum(1).float()
    mixed = mixed_groups(batch.rewards, cfg.group_size)
    out = {
        "reward/mean": float(first.rewards.mean()), "acc": float(first.correct.float().mean()),
        "response_len/mean": float(lengths.mean()), "response_len/max": float(lengths.max()),
        "response/truncated_frac": float(first.truncated.float().mean()),
        "sampling/draws": float(len(draws)), "sampling/mixed_group_frac": sum(mixed) / len(mixed),
        "batch/reward_mean": float(batch.rewards.mean()), "batch/acc": float(batch.correct.float().mean()),
    }
    for key in sorted({k for d in draws for k in d.metrics}):
        values = [d.metrics[key] for d in draws if key in d.metrics]
        out[key] = sum(values) / len(values)
    return out
