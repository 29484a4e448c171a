"""Evaluation of a pre-trained base: greedy pass@1 on the held-out suites, MTP agreement.

pass@1 is the share of problems whose greedy completion earns reward 1 from the problem's own
task family. Greedy decoding uses the rollout engine (`mtprl.rollout.generate`, temperature 0,
no drafting), the same code that samples during RL.
The MTP agreement is teacher-forced: on the reference solutions, the share of solution tokens
that depth k's argmax predicts exactly (`LogProbs.mtp_top1`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from mtprl.rollout import SamplingParams, generate
from mtprl.tasks import Problem, get_task
from mtprl.pretrain.data import encode_batch


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                       batch_size: int = 256) -> list[str]:
    """The greedy continuation of each prompt up to <eos> or `max_new_tokens`, special tokens dropped."""
    was_training = model.training
    model.eval()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer(p)["input_ids"] for p in prompts[start: start + batch_size]]
        rollout = generate(model, ids, params, eos_token_id=tokenizer.eos_token_id)
        out.extend(tokenizer.decode(row[mask], skip_special_tokens=True)
                   for row, mask in zip(rollout.response_ids, rollout.response_mask))  # [R] each
    model.train(was_training)
    return out


def suite_pass_at_1(model, tokenizer, problems: Sequence[Problem], batch_size: int = 256,
                    max_new_tokens: int | None = None) -> float:
    """Greedy pass@1 on one suite; the token budget defaults to the longest reference solution + 16."""
    if not problems:
        raise ValueError("suite_pass_at_1 needs at least one problem")
    budget = max_new_tokens or max(len(p.solution) for p in problems) + 16
    completions = greedy_completions(model, tokenizer, [p.prompt for p in problems], budget, batch_size)
    task = get_task(problems[0].family)
    return sum(task.reward(p, c) for p, c in zip(problems, completions)) / len(problems)


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


def evaluate_base(model, tokenizer, suites: dict[str, list[Problem]], batch_size: int = 256) -> dict:
    """Per-suite greedy pass@1, its mean, and the per-depth MTP agreement over all suites."""
    pass_at_1 = {name: suite_pass_at_1(model, tokenizer, problems, batch_size) for name, problems in suites.items()}
    every = [p for problems in suites.values() for p in problems]
    return {
        "pass_at_1": pass_at_1,
        "pass_at_1_mean": sum(pass_at_1.values()) / max(len(pass_at_1), 1),
        "mtp_top1_agreement": mtp_top1_agreement(model, tokenizer, every, batch_size),
    }
