"""Training batches for pre-training the embedded default on generated solution traces.

Each example is `<bos> prompt solution <eos>`; the loss covers the solution and the end token
only (the prompt's random digits are not worth the tiny model's capacity). Each trace is drawn
from a mixture (`trace_kind`):
- "shortcut" with probability `shortcut_fraction`: the family's plausible shortcut applied
  throughout (`TaskFamily.shortcut`: additions without carries, expressions read left to right,
  sorting that skips repeats), well-formed and right on part of the problems only;
- "slip" with probability `slip_fraction`: one wrong step carried through or a wrong final answer
  (`TaskFamily.corrupt`), always wrong;
- "correct" otherwise: the reference procedure.
The shortcut traces are what give RL something to select: a base that learnt both the procedure
and the habit picks between them when sampling (pass@k well above pass@1), and RL can move that
choice, as RL on real LMs mostly turns pass@k into pass@1. Slips, by contrast, are noise that
sharpening cannot remove. Batches are right-padded and grouped by length (examples of
`group_batches` batches are sorted by length, cut into batches, and the batches shuffled) to
waste little compute on padding. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterator, Sequence

import torch

from mtprl.tasks import Problem, get_task, iter_training_problems

TRACE_KINDS = ("correct", "shortcut", "slip")


@dataclasses.dataclass
class TraceBatch:
    """One right-padded batch of prompt + solution texts."""

    input_ids: torch.Tensor  # [B, L] long, pad id after the text
    attention_mask: torch.Tensor  # [B, L] long 0/1
    loss_mask: torch.Tensor  # [B, L] bool, True at target positions of solution tokens and <eos>
    kinds: list[str] = dataclasses.field(default_factory=list)  # [B] trace kind of each row (TRACE_KINDS)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def trace_kind(rng: random.Random, shortcut_fraction: float, slip_fraction: float) -> str:
    """One draw from the mixture: "shortcut", "slip" or "correct"."""
    u = rng.random()
    if u < shortcut_fraction:
        return "shortcut"
    return "slip" if u < shortcut_fraction + slip_fraction else "correct"


def training_completion(problem: Problem, kind: str, rng: random.Random) -> str:
    """The solution trace of the given kind for `problem`."""
    if kind == "correct":
        return problem.solution
    task = get_task(problem.family)
    if kind == "shortcut":
        return task.shortcut(problem)
    if kind == "slip":
        return task.imperfect_solution(problem, rng)
    raise ValueError(f"unknown trace kind '{kind}'; known: {', '.join(TRACE_KINDS)}")


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
    shortcut_fraction: float,
    slip_fraction: float,
    suite_seed: int,
    suite_size: int,
    group_batches: int = 16,
) -> Iterator[TraceBatch]:
    """An endless, seeded stream of length-grouped training batches (suite prompts excluded)."""
    if not (0.0 <= shortcut_fraction and 0.0 <= slip_fraction and shortcut_fraction + slip_fraction <= 1.0):
        raise ValueError(f"shortcut_fraction ({shortcut_fraction}) and slip_fraction ({slip_fraction}) must be "
                         ">= 0 and sum to at most 1")
    problems = iter_training_problems(seed, families, difficulties, suite_seed, suite_size)
    rng = random.Random(f"pretrain-data:{seed}")
    while True:
        group = [next(problems) for _ in range(batch_size * group_batches)]
        kinds = [trace_kind(rng, shortcut_fraction, slip_fraction) for _ in group]
        texts = [(p.prompt, training_completion(p, k, rng), k) for p, k in zip(group, kinds)]
        texts.sort(key=lambda pck: len(pck[0]) + len(pck[1]))
        chunks = [texts[i: i + batch_size] for i in range(0, len(texts), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            batch = encode_batch(tokenizer, [p for p, _, _ in chunk], [c for _, c, _ in chunk])
            batch.kinds = [k for _, _, k in chunk]
            yield batch
