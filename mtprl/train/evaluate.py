"""Evaluation on the held-out suites: avg@k with its standard error, greedy accuracy, habits, MTP quality.

Per suite: `eval_k` samples per problem at `eval_temperature` (avg@k: the mean accuracy over all
k·n samples) and one greedy completion per problem (greedy). Intermediate evaluations use the
first `eval_limit` problems of each suite; the final one (step == steps) the first
`final_eval_limit` (0: eval_limit), so the intermediate problems are a prefix of the final ones.
Each accuracy comes with its standard error over problems (`eval_se/...`, `mtprl.tasks.scoring`:
the problems are the independent units, a problem's k samples are not); `eval/avg/...` averages
the suites, with SE √(Σ SE²)/S. `eval_n/problems` and `eval_n/samples` record the sizes used.
For the generated families, `habit/{suite}/shortcut` is the share of samples that reproduce the
family's shortcut trace exactly, among problems where it differs from the reference (what RL is
meant to select away), and `habit/{suite}/reference` the share that reproduce the reference.
MTP quality: with `draft_tokens` > 0 the greedy completions are drafted by the MTP head and
`eval/mtp_accept` is the engine's acceptance rate; otherwise `eval/mtp_top1` (and per head
`eval/mtp/{k}/top1`) is the teacher-forced top-1 agreement of each MTP head with the greedy
completions' tokens. Samples are seeded by (seed, step, suite), per worker or per problem as `rollout_rng`
says (`mtprl.train.rollouts`): re-running gives the same numbers.
Per-problem results (correct samples and greedy verdict of every problem) go to
`evals/step-N.json` in the run directory (`write_problem_results`), so a run can be compared with
its base problem by problem (a paired SE).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mtprl.tasks import TASKS, get_task
from mtprl.tasks.scoring import average_of_suites, mean_se, suite_accuracy
from mtprl.train.batch import TrainBatch, derive_seed, response_log_probs
from mtprl.train.data import RewardFn, encode_prompts
from mtprl.train.distributed import Dist
from mtprl.train.rollouts import generate_shared, sampling_params


def eval_size(cfg, step: int) -> int:
    """Problems per suite evaluated at `step`: final_eval_limit at the last step (when set), else eval_limit."""
    final = getattr(cfg, "final_eval_limit", 0)
    return final if step == cfg.steps and final else cfg.eval_limit


def _gather_texts(texts: list[str], dist: Dist) -> list[str]:
    if dist.world == 1:
        return texts
    import torch.distributed as tdist

    parts: list = [None] * dist.world
    tdist.all_gather_object(parts, texts)
    return [t for part in parts for t in part]


def _completions(model, tokenizer, prompts, params, seed, dist: Dist, rng: str = "batch"):
    """(rollout of this worker, every worker's completion texts in prompt-major order)."""
    rollout, texts, _ = generate_shared(model, tokenizer, prompts, params, seed, dist, rng=rng)
    return rollout, _gather_texts(texts, dist)


def _habits(problems, texts: list[str], k: int) -> dict[str, float]:
    """Shares of samples copying the reference trace, and the shortcut where it differs (generated families)."""
    if not problems or problems[0].family not in TASKS:
        return {}
    task = get_task(problems[0].family)
    reference = [sum(t == p.solution for t in texts[i * k:(i + 1) * k]) / k for i, p in enumerate(problems)]
    out = {"reference": sum(reference) / len(reference)}
    shortcut = [sum(t == s for t in texts[i * k:(i + 1) * k]) / k
                for i, (p, s) in enumerate((p, task.shortcut(p)) for p in problems) if s != p.solution]
    if shortcut:
        out["shortcut"] = sum(shortcut) / len(shortcut)
    return out


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


def evaluate(model, tokenizer, suites: dict, reward_fn: RewardFn, cfg, step: int, dist: Dist,
             size: int | None = None) -> tuple[dict[str, float], dict[str, dict]]:
    """(metrics: eval/, eval_se/, eval_n/, habit/ keys; per-problem results {suite: {correct, greedy}}).

    `size`: problems per suite; None: `eval_size(cfg, step)`.
    """
    out: dict[str, float] = {}
    detail: dict[str, dict] = {}
    k, size = cfg.eval_k, eval_size(cfg, step) if size is None else size
    accept, top1, avg, greedy_avg = [], [], [], []
    for name, every in suites.items():
        problems = every[:size]
        prompts = encode_prompts(tokenizer, problems, cfg.chat_template, cfg.max_prompt_tokens)
        seed = derive_seed("eval", cfg.seed, step, name)
        _, texts = _completions(model, tokenizer, prompts, sampling_params(cfg, k, cfg.eval_temperature), seed, dist,
                                cfg.rollout_rng)
        correct = [sum(reward_fn(p, t) >= 1.0 for t in texts[i * k:(i + 1) * k]) for i, p in enumerate(problems)]
        greedy, gtexts = _completions(model, tokenizer, prompts, sampling_params(cfg, 1, 0.0), seed, dist,
                                      cfg.rollout_rng)
        right = [int(reward_fn(p, t) >= 1.0) for p, t in zip(problems, gtexts)]
        detail[name] = {"correct": correct, "greedy": right, "samples": k}
        (acc, se), (g, gse) = suite_accuracy(correct, k), suite_accuracy(right, 1)
        out.update({f"eval/{name}/avg@{k}": acc, f"eval_se/{name}/avg@{k}": se,
                    f"eval/{name}/greedy": g, f"eval_se/{name}/greedy": gse})
        avg.append((acc, se))
        greedy_avg.append((g, gse))
        out.update({f"habit/{name}/{h}": v for h, v in _habits(problems, texts, k).items()})
        if cfg.draft_tokens > 0:
            accept.append(dist.mean_values({"a": greedy.metrics["rollout/accept_rate"]})["a"])
        else:
            top1.append(mtp_top1(model, greedy, cfg.micro_batch_size, dist))
    if suites:
        (out[f"eval/avg/avg@{k}"], out[f"eval_se/avg/avg@{k}"]) = average_of_suites(avg)
        (out["eval/avg/greedy"], out["eval_se/avg/greedy"]) = average_of_suites(greedy_avg)
        out["eval_n/problems"] = float(min(size, min(len(v) for v in suites.values())))
        out["eval_n/samples"] = float(k)
        for h in ("reference", "shortcut"):
            values = [out[f"habit/{n}/{h}"] for n in suites if f"habit/{n}/{h}" in out]
            if values:
                out[f"habit/avg/{h}"] = mean_se(values)[0]
    if accept:
        out["eval/mtp_accept"] = sum(accept) / len(accept)
    if top1:
        for head in range(len(top1[0])):
            out[f"eval/mtp/{head}/top1"] = sum(t[head] for t in top1) / len(top1)
        out["eval/mtp_top1"] = out["eval/mtp/0/top1"]
    return out, detail


def write_problem_results(run_dir: Path, step: int, detail: dict[str, dict]) -> Path:
    """Write `evals/step-N.json` (per suite: correct samples per problem, greedy verdicts) atomically."""
    folder = Path(run_dir) / "evals"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step": step, "suites": detail}))
    os.replace(tmp, path)
    return path
