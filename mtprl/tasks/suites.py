"""Held-out evaluation suites and the training problem stream that avoids them.

Six suites (three families x two difficulty levels) stand in for the paper's six benchmarks.
They are fixed by a seed and a size, hold distinct prompts, and keep stable names so reports of
different runs can be compared. The training stream draws from the same families, by default at
the suites' own difficulty levels (`SUITE_LEVELS`: a train/test split of one distribution, so the
tiny model's capacity goes to what is evaluated), or at any levels asked for, and skips every
prompt that appears in a suite (disjointness by prompt string).
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator, Sequence

from mtprl.tasks.base import Problem
from mtprl.tasks.registry import get_task

# suite name -> (family, difficulty). Names are part of the public interface: do not rename.
SUITES: dict[str, tuple[str, int]] = {
    "add-easy": ("add", 1),
    "add-hard": ("add", 2),
    "expr-easy": ("expr", 1),
    "expr-hard": ("expr", 2),
    "sort-easy": ("sort", 2),
    "sort-hard": ("sort", 3),
}
SUITE_SEED = 7919
SUITE_SIZE = 256
# family -> the difficulty levels of its suites: the default training levels.
SUITE_LEVELS: dict[str, tuple[int, ...]] = {}
for _family, _level in SUITES.values():
    SUITE_LEVELS[_family] = SUITE_LEVELS.get(_family, ()) + (_level,)
TRAIN_DIFFICULTIES: tuple[int, ...] = ()  # empty: each family at its SUITE_LEVELS


def suite_problems(name: str, seed: int = SUITE_SEED, size: int = SUITE_SIZE) -> list[Problem]:
    """The `size` distinct problems of suite `name`, deterministic for (name, seed, size)."""
    if name not in SUITES:
        raise KeyError(f"unknown suite '{name}'; known: {', '.join(SUITES)}")
    family, difficulty = SUITES[name]
    task = get_task(family)
    rng = random.Random(f"suite:{seed}:{name}")
    problems: dict[str, Problem] = {}
    for _ in range(50 * size):
        if len(problems) == size:
            break
        problem = task.make_problem(rng, difficulty)
        problems.setdefault(problem.prompt, problem)
    if len(problems) < size:
        raise ValueError(f"suite '{name}' has fewer than {size} distinct problems; ask for a smaller size")
    return list(problems.values())


def eval_suites(
    seed: int = SUITE_SEED, size: int = SUITE_SIZE, names: Sequence[str] | None = None
) -> dict[str, list[Problem]]:
    """Suite name -> its problems, for all suites (or the named ones), in `SUITES` order."""
    chosen = list(SUITES) if names is None else list(names)
    return {name: suite_problems(name, seed, size) for name in chosen}


def iter_training_problems(
    seed: int,
    families: Sequence[str] | None = None,
    difficulties: Sequence[int] = TRAIN_DIFFICULTIES,
    suite_seed: int = SUITE_SEED,
    suite_size: int = SUITE_SIZE,
) -> Iterator[Problem]:
    """An endless stream of training problems, uniform over families, then over difficulties.

    `difficulties` empty: each family at its suites' levels (`SUITE_LEVELS`); a family without a
    suite then needs explicit levels. Every prompt of the suites fixed by (`suite_seed`,
    `suite_size`) is skipped, so pass the values the evaluation uses. Deterministic for a given
    seed; repeats are possible.
    """
    families = sorted({family for family, _ in SUITES.values()}) if families is None else list(families)
    if not families:
        raise ValueError("training_problems needs at least one family")
    levels = {name: list(difficulties) or list(SUITE_LEVELS.get(name, ())) for name in families}
    missing = [name for name, found in levels.items() if not found]
    if missing:
        raise ValueError(f"families {missing} have no suite, so their training difficulties must be given")
    tasks = [(get_task(name), levels[name]) for name in families]
    held_out = {p.prompt for suite in eval_suites(suite_seed, suite_size).values() for p in suite}
    rng = random.Random(f"train:{seed}")
    while True:
        task, task_levels = rng.choice(tasks)
        problem = task.make_problem(rng, rng.choice(task_levels))
        if problem.prompt not in held_out:
            yield problem


def training_problems(
    seed: int,
    n: int,
    families: Sequence[str] | None = None,
    difficulties: Sequence[int] = TRAIN_DIFFICULTIES,
    suite_seed: int = SUITE_SEED,
    suite_size: int = SUITE_SIZE,
) -> list[Problem]:
    """The first `n` problems of `iter_training_problems` with the same arguments."""
    stream = iter_training_problems(seed, families, difficulties, suite_seed, suite_size)
    return list(itertools.islice(stream, n))
