"""Evaluation of a pre-trained base on the held-out suites: greedy accuracy, pass@k at T = 1, habits.

Per suite: the greedy completion of every problem (greedy accuracy), and `samples` completions per
problem at temperature 1 (the distribution RL samples from), from which pass@1, pass@4, pass@16
(the unbiased estimator, `mtprl.tasks.scoring`) and their standard errors over problems follow.
The headroom RL can convert is pass@k − pass@1. The samples are also sorted by what they copy:
the share that reproduces the reference trace exactly, and, among problems where the family's
shortcut gives another trace, the share that reproduces the shortcut exactly (the habit RL is
meant to select away). Decoding uses the rollout engine (`mtprl.rollout.generate`), the same code
that samples during RL, seeded per suite. The MTP agreement is teacher-forced: on the reference
solutions, the share of solution tokens that depth k's argmax predicts exactly.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from mtprl.pretrain.data import encode_batch
from mtprl.rollout import SamplingParams, generate
from mtprl.tasks import Problem, get_task
from mtprl.tasks.scoring import average_of_suites, mean_se, suite_accuracy, suite_pass_at_k

PASS_KS = (1, 4, 16)


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, n: int = 1,
                       temperature: float = 0.0, seed: int = 0, batch_rows: int = 1024) -> list[list[str]]:
    """`n` continuations of each prompt up to <eos> or `max_new_tokens` (greedy at temperature 0)."""
    was_training = model.training
    model.eval()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n)
    per_call = max(1, batch_rows // n)
    out: list[list[str]] = []
    for start in range(0, len(prompts), per_call):
        ids = [tokenizer(p)["input_ids"] for p in prompts[start: start + per_call]]
        generator = torch.Generator(device=model.device).manual_seed(_seed(seed, start))
        rollout = generate(model, ids, params, eos_token_id=tokenizer.eos_token_id, generator=generator)
        texts = [tokenizer.decode(row[mask], skip_special_tokens=True)
                 for row, mask in zip(rollout.response_ids, rollout.response_mask)]
        out.extend(texts[i * n: (i + 1) * n] for i in range(len(ids)))
    model.train(was_training)
    return out


def greedy_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                       batch_size: int = 256) -> list[str]:
    """The greedy continuation of each prompt up to <eos> or `max_new_tokens`, special tokens dropped."""
    return [c[0] for c in sample_completions(model, tokenizer, prompts, max_new_tokens, batch_rows=batch_size)]


def token_budget(problems: Sequence[Problem]) -> int:
    """Room for the longest reference or shortcut trace of the suite, plus 16 tokens."""
    task = get_task(problems[0].family)
    return max(max(len(p.solution), len(task.shortcut(p))) for p in problems) + 16


def evaluate_suite(model, tokenizer, problems: Sequence[Problem], samples: int = 16, temperature: float = 1.0,
                   seed: int = 0, batch_rows: int = 1024) -> dict:
    """Greedy accuracy, pass@k (k in PASS_KS up to `samples`) at `temperature`, and the habit shares."""
    if not problems:
        raise ValueError("evaluate_suite needs at least one problem")
    task, budget = get_task(problems[0].family), token_budget(problems)
    prompts = [p.prompt for p in problems]
    greedy = [task.reward(p, c[0]) >= 1.0 for p, c in
              zip(problems, sample_completions(model, tokenizer, prompts, budget, batch_rows=batch_rows))]
    sampled = sample_completions(model, tokenizer, prompts, budget, samples, temperature, seed, batch_rows)
    correct = [sum(task.reward(p, c) >= 1.0 for c in cs) for p, cs in zip(problems, sampled)]
    out: dict = {"problems": len(problems), "samples": samples, "temperature": temperature}
    out["greedy"], out["greedy_se"] = suite_accuracy([int(g) for g in greedy], 1)
    for k in (k for k in PASS_KS if k <= samples):
        out[f"pass@{k}"], out[f"pass@{k}_se"] = suite_pass_at_k(correct, samples, k)
    out["reference_share"] = mean_se([sum(c == p.solution for c in cs) / samples
                                      for p, cs in zip(problems, sampled)])[0]
    differs = [(task.shortcut(p), cs) for p, cs in zip(problems, sampled) if task.shortcut(p) != p.solution]
    out["shortcut_share"] = (mean_se([sum(c == s for c in cs) / samples for s, cs in differs])[0]
                             if differs else None)
    return out


@torch.no_grad()
def mtp_top1_agreement(model, tokenizer, problems: Sequence[Problem], batch_size: int = 256) -> list[float]:
    """Per MTP depth: share of reference-solution tokens that the depth's argmax predicts."""
    was_training = model.training
    model.eval()
    hits = torch.zeros(model.num_mtp, dtype=torch.float64)
    counts = torch.zeros(model.num_mtp, dtype=torch.float64)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start: start + batch_size]
        batch = encode_batch(tokenizer, [p.prompt for p in chunk], [p.solution for p in chunk])
        lp = model.token_log_probs(batch.input_ids, batch.attention_mask)
        scored = lp.mtp_mask & batch.loss_mask.unsqueeze(0)  # [K, B, L]
        hits += (lp.mtp_top1 & scored).sum(dim=(1, 2)).double()
        counts += scored.sum(dim=(1, 2)).double()
    model.train(was_training)
    return (hits / counts.clamp(min=1)).tolist()


def evaluate_base(model, tokenizer, suites: dict[str, list[Problem]], samples: int = 16, temperature: float = 1.0,
                  batch_rows: int = 1024) -> dict:
    """Per-suite results of `evaluate_suite`, their means over suites (with SE), and the MTP agreement."""
    per_suite = {name: evaluate_suite(model, tokenizer, problems, samples, temperature, seed=_seed("base", name),
                                      batch_rows=batch_rows)
                 for name, problems in suites.items()}
    metrics = ["greedy"] + [f"pass@{k}" for k in PASS_KS if k <= samples]
    mean = {}
    for m in metrics:
        mean[m], mean[f"{m}_se"] = average_of_suites([(r[m], r[f"{m}_se"]) for r in per_suite.values()])
    every = [p for problems in suites.values() for p in problems]
    return {"suites": per_suite, "mean": mean,
            "mtp_top1_agreement": mtp_top1_agreement(model, tokenizer, every, min(batch_rows, 256))}
