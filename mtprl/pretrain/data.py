"""Training batches for pre-training the embedded default on generated solution traces.

Each example is `<bos> prompt solution <eos>`; the loss covers the solution and the end token
only (the prompt's random digits are not worth the tiny model's capacity). A share
`imperfect_fraction` of the solutions is replaced by an imperfect trace (a wrong step carried
through, or a wrong final answer; see `TaskFamily.corrupt`), so the base model is not a perfect
solver and RL has something to improve. Batches are right-padded and grouped by length
(examples of `group_batches` batches are sorted by length, cut into batches, and the batches
shuffled) to waste little compute on padding. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterator, Sequence

import torch

from mtprl.tasks import Problem, get_task, iter_training_problems


@dataclasses.dataclass
class TraceBatch:
    """One right-padded batch of prompt + solution texts."""

    input_ids: torch.Tensor  # [B, L] long, pad id after the text
    attention_mask: torch.Tensor  # [B, L] long 0/1
    loss_mask: torch.Tensor  # [B, L] bool, True at target positions of solution tokens and <eos>

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def training_completion(problem: Problem, imperfect: bool, rng: random.Random) -> str:
    """The solution trace to train on: the correct one, or an imperfect one when asked."""
    if not imperfect:
        return problem.solution
    return get_task(problem.family).imperfect_solution(problem, rng)


def encode_batch(tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> TraceBatch:
    """Right-padded ids of `<bos> prompt completion <eos>` with the completion's loss mask."""
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    rows = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompt_ids, completion_ids)]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (row, p) in enumerate(zip(rows, prompt_ids)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        loss_mask[i, len(p): len(row)] = True  # completion tokens and <eos>
    return TraceBatch(input_ids, attention_mask, loss_mask)


def trace_batches(
    tokenizer,
    seed: int,
    batch_size: int,
    families: Sequence[str],
    difficulties: Sequence[int],
    imperfect_fraction: float,
    suite_seed: int,
    suite_size: int,
    group_batches: int = 16,
) -> Iterator[TraceBatch]:
    """An endless, seeded stream of length-grouped training batches (suite prompts excluded)."""
    if not 0.0 <= imperfect_fraction <= 1.0:
        raise ValueError(f"imperfect_fraction must lie in [0, 1], got {imperfect_fraction}")
    problems = iter_training_problems(seed, families, difficulties, suite_seed, suite_size)
    rng = random.Random(f"pretrain-data:{seed}")
    while True:
        group = [next(problems) for _ in range(batch_size * group_batches)]
        texts = [(p.prompt, training_completion(p, rng.random() < imperfect_fraction, rng)) for p in group]
        texts.sort(key=lambda pc: len(pc[0]) + len(pc[1]))
        chunks = [texts[i: i + batch_size] for i in range(0, len(texts), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield encode_batch(tokenizer, [p for p, _ in chunk], [c for _, c in chunk])
