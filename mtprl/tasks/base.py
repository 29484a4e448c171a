"""The problem record and the task-family interface shared by every generated family.

A family turns a seed and a difficulty into problems `(prompt, answer, solution)`. The text
format is the same for all families and uses only printable ASCII and newlines (the default
tokenizer is character-level):

    <prompt ending in "\\n"><one step per line>\\n#### <answer>

`solution` is everything after the prompt, i.e. exactly what a model should generate. The family
owns its reward: 1.0 when the normalised answer after the first `####` equals the reference,
otherwise 0.0 (or `format_reward` when a well-formed but wrong answer is given; off by default).
Families also write two kinds of imperfect traces for pre-training a base model that leaves room
for RL: a *shortcut* (a plausible habit applied consistently, well-formed and right on part of
the problems, e.g. additions without carries; `shortcut`), and *slips* (one wrong step carried
through, or correct steps with a wrong final answer; `corrupt`). A base that has learnt both the
procedure and the shortcut chooses between them at sampling time, which is what RL can select.
"""

from __future__ import annotations

import dataclasses
import random
from abc import ABC, abstractmethod
from typing import Any, Callable, Literal, Sequence

from mtprl.tasks.answers import ANSWER_MARKER, extract_answer

CorruptionKind = Literal["step", "answer"]
CORRUPTION_KINDS: tuple[CorruptionKind, ...] = ("step", "answer")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    prompt: the text given to the model (ends with a newline for generated families).
    answer: the reference answer in canonical (normalised) form.
    solution: a correct step-by-step trace ending with the line `#### <answer>`; "" when unknown.
    family: the task family's name ("add", "expr", "sort", "math", ...).
    difficulty: the family's difficulty level (0 when the source gives none).
    meta: family-specific data needed to rebuild or corrupt the trace (JSON-serialisable).
    """

    prompt: str
    answer: str
    solution: str
    family: str
    difficulty: int
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def text(self) -> str:
        """Prompt followed by the solution: the training text for pre-training."""
        return self.prompt + self.solution


def as_rng(seed_or_rng: int | str | random.Random) -> random.Random:
    """A `random.Random` from a seed (int or str, stable across runs and platforms) or itself."""
    if isinstance(seed_or_rng, random.Random):
        return seed_or_rng
    if isinstance(seed_or_rng, bool) or not isinstance(seed_or_rng, (int, str)):
        raise TypeError(f"seed must be an int, a str or a random.Random, got {type(seed_or_rng).__name__}")
    return random.Random(seed_or_rng)


def final_line(answer: str) -> str:
    """The last line of every trace."""
    return f"{ANSWER_MARKER} {answer}"


class TaskFamily(ABC):
    """A seeded generator of verifiable problems plus its reward.

    Subclasses set `name`, `normalize` (text -> canonical answer or None) and implement
    `make_problem`, `shortcut` and `corrupt`.
    """

    name: str = ""
    normalize: Callable[[str | None], str | None]  # a staticmethod in subclasses

    def __init__(self, format_reward: float = 0.0) -> None:
        if not 0.0 <= format_reward < 1.0:
            raise ValueError(f"format_reward must lie in [0, 1), got {format_reward}; use 0 to switch it off")
        self.format_reward = float(format_reward)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(format_reward={self.format_reward})"

    @abstractmethod
    def make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        """One problem of the given difficulty drawn from `rng`."""

    @abstractmethod
    def shortcut(self, problem: Problem) -> str:
        """The family's shortcut trace for `problem`: the same line format, a plausible habit applied
        throughout; it reaches the right answer on part of the problems only."""

    @abstractmethod
    def corrupt(self, problem: Problem, rng: random.Random, kind: CorruptionKind) -> str:
        """An imperfect solution trace whose final answer is wrong.

        kind "step": one intermediate step is wrong and later steps follow from it;
        kind "answer": every step is right but the final answer line is wrong.
        """

    def check_difficulty(self, difficulty: int) -> None:
        if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty < 1:
            raise ValueError(f"{self.name}: difficulty must be an integer >= 1, got {difficulty!r}")

    def generate(self, seed_or_rng: int | str | random.Random, n: int, difficulty: int) -> list[Problem]:
        """`n` problems of one difficulty, deterministic for a given seed (repeats possible)."""
        self.check_difficulty(difficulty)
        if n < 0:
            raise ValueError(f"{self.name}: n must be >= 0, got {n}")
        rng = as_rng(seed_or_rng)
        return [self.make_problem(rng, difficulty) for _ in range(n)]

    def imperfect_solution(self, problem: Problem, rng: random.Random) -> str:
        """A corrupted trace of a uniformly chosen kind (see `corrupt`)."""
        return self.corrupt(problem, rng, rng.choice(CORRUPTION_KINDS))

    def grade(self, problem: Problem, completion: str) -> tuple[str | None, float]:
        """(normalised answer found in `completion` or None, reward)."""
        predicted = self.normalize(extract_answer(completion))
        if predicted is None:
            return None, 0.0
        return predicted, 1.0 if predicted == problem.answer else self.format_reward

    def reward(self, problem: Problem, completion: str) -> float:
        """1.0 for a correct final answer, `format_reward` for a well-formed wrong one, else 0.0."""
        return self.grade(problem, completion)[1]

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> tuple[list[float], dict[str, float]]:
        """Rewards for a batch and metrics: mean reward, accuracy, share of parseable answers."""
        if len(problems) != len(completions):
            raise ValueError(f"got {len(problems)} problems but {len(completions)} completions; pass one each")
        graded = [self.grade(p, c) for p, c in zip(problems, completions)]
        rewards = [reward for _, reward in graded]
        n = max(len(problems), 1)
        metrics = {
            "reward_mean": sum(rewards) / n,
            "accuracy": sum(a is not None and a == p.answer for (a, _), p in zip(graded, problems)) / n,
            "parsed_rate": sum(a is not None for a, _ in graded) / n,
        }
        return rewards, metrics
