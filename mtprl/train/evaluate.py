"""Evaluation on the held-out suites: avg@k at the eval temperature, greedy pass@1, MTP drafting quality.

Per suite: `eval_k` samples per problem at `eval_temperature` (avg@k: the mean accuracy over all
k·n samples) and one greedy completion per problem (greedy). Then `eval/avg/...` averages the
suites. MTP quality: with `draft_tokens` > 0 the greedy completions are drafted by the MTP head and
`eval/mtp_accept` is the engine's acceptance rate; otherwise `eval/mtp_top1` (and per head
`eval/mtp/{k}/top1`) is the teacher-forced top-1 agreement of each MTP head with the greedy
completions' tokens. Samples are seeded by (seed, step, suite): re-running gives the same numbers.
"""

from __future__ import annotations

import torch

from mtprl.train.batch import TrainBatch, derive_seed, response_log_probs
from mtprl.train.data import RewardFn, encode_prompts
from mtprl.train.distributed import Dist
from mtprl.train.rollouts import generate_shared, sampling_params


def _accuracy(rollout, texts, problems, share, reward_fn: RewardFn, dist: Dist) -> float:
    local = [problems[share][int(i)] for i in rollout.prompt_index]
    correct = torch.tensor([reward_fn(p, t) >= 1.0 for p, t in zip(local, texts)], dtype=torch.float32,
                           device=rollout.response_ids.device)
    return float(dist.gather_rows(correct).mean())


@torch.no_grad()
def mtp_top1(model, rollout, micro_batch_size: int, dist: Dist) -> list[float]:
    """Teacher-forced top-1 agreement of each MTP head with the rollout's tokens (averaged over workers)."""
    K = model.num_mtp
    hits, counts = torch.zeros(K), torch.zeros(K)
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
    mask = torch.cat([rollout.prompt_mask.bool(), rollout.response_mask.bool()], 1)
    batch = TrainBatch.build(ids, mask, rollout.response_mask.bool(), torch.zeros(ids.shape[0]), K)
    for rows in torch.arange(batch.size).split(micro_batch_size):
        mb = batch.select(rows)
        lp = response_log_probs(model, mb, 1.0, mtp=True)
        hits += (lp.mtp_top1 & mb.head_mask).sum((1, 2)).float().cpu()
        counts += mb.head_mask.sum((1, 2)).float().cpu()
    totals = dist.mean_values({**{f"h{k}": float(hits[k]) for k in range(K)},
                               **{f"n{k}": float(counts[k]) for k in range(K)}})
    return [totals[f"h{k}"] / max(totals[f"n{k}"], 1e-12) for k in range(K)]


def evaluate(model, tokenizer, suites: dict, reward_fn: RewardFn, cfg, step: int, dist: Dist) -> dict[str, float]:
    """`eval/{suite}/avg@{k}`, `eval/{suite}/greedy`, their averages `eval/avg/...`, and the MTP metric."""
    out: dict[str, float] = {}
    k = cfg.eval_k
    accept, top1 = [], []
    for name, problems in suites.items():
        prompts = encode_prompts(tokenizer, problems, cfg.chat_template, cfg.max_prompt_tokens)
        seed = derive_seed("eval", cfg.seed, step, name)
        params = sampling_params(cfg, k, cfg.eval_temperature)
        sampled, texts, share = generate_shared(model, tokenizer, prompts, params, seed, dist)
        out[f"eval/{name}/avg@{k}"] = _accuracy(sampled, texts, problems, share, reward_fn, dist)
        greedy, texts, share = generate_shared(model, tokenizer, prompts, sampling_params(cfg, 1, 0.0), seed, dist)
        out[f"eval/{name}/greedy"] = _accuracy(greedy, texts, problems, share, reward_fn, dist)
        if cfg.draft_tokens > 0:
            accept.append(dist.mean_values({"a": greedy.metrics["rollout/accept_rate"]})["a"])
        else:
            top1.append(mtp_top1(model, greedy, cfg.micro_batch_size, dist))
    if suites:
        out[f"eval/avg/avg@{k}"] = sum(out[f"eval/{n}/avg@{k}"] for n in suites) / len(suites)
        out["eval/avg/greedy"] = sum(out[f"eval/{n}/greedy"] for n in suites) / len(suites)
    if accept:
        out["eval/mtp_accept"] = sum(accept) / len(accept)
    if top1:
        for head in range(len(top1[0])):
            out[f"eval/mtp/{head}/top1"] = sum(t[head] for t in top1) / len(top1)
        out["eval/mtp_top1"] = out["eval/mtp/0/top1"]
    return out
