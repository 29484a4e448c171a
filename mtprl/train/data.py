"""Training problems, held-out suites and rewards for a `TrainConfig`, with a resumable position.

Without `data`, problems come from the generated families (`mtprl.tasks.iter_training_problems`,
which never repeats a suite prompt) and each problem is scored by its own family. With `data`,
problems come from a `MathTask`, reshuffled on every pass with a seed. Either way the stream is a
pure function of (seed, position), so a resumed run draws exactly the problems the uninterrupted
run would have drawn.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Callable, Iterator

from mtprl.tasks import SUITE_SIZE, SUITES, MathTask, Problem, get_task, iter_training_problems, suite_problems

RewardFn = Callable[[Problem, str], float]


class ProblemStream:
    """An endless, seeded stream of training problems; `position` counts the problems drawn so far."""

    def __init__(self, make_iter: Callable[[], Iterator[Problem]], position: int = 0):
        self._make_iter = make_iter
        self.position = 0
        self._iter = make_iter()
        self.seek(position)

    def seek(self, position: int) -> None:
        """Continue as if `position` problems had been drawn (restarting the stream if needed)."""
        if position < self.position:
            self._iter, self.position = self._make_iter(), 0
        for _ in itertools.islice(self._iter, position - self.position):
            pass
        self.position = position

    def take(self, n: int) -> list[Problem]:
        problems = list(itertools.islice(self._iter, n))
        self.position += n
        return problems


def _shuffled_passes(problems: list[Problem], seed: int) -> Iterator[Problem]:
    """The problems in a new seeded order on every pass over them, forever."""
    for epoch in itertools.count():
        order = list(range(len(problems)))
        random.Random(f"data:{seed}:{epoch}").shuffle(order)
        yield from (problems[i] for i in order)


def _math_task(cfg, path: str, limit: int | None = None) -> MathTask:
    return MathTask(path, problem_key=cfg.data_problem_key, answer_key=cfg.data_answer_key, limit=limit)


def build_problems(cfg) -> tuple[ProblemStream, RewardFn, dict[str, list[Problem]]]:
    """(training stream, reward function, held-out suites) for a TrainConfig."""
    eval_limit = max(cfg.eval_limit, getattr(cfg, "final_eval_limit", 0))  # the evaluation takes prefixes
    if cfg.data is not None:
        task = _math_task(cfg, cfg.data)
        suites = {Path(p).stem: _math_task(cfg, p, eval_limit).problems for p in cfg.eval_data}
        stream = ProblemStream(lambda: _shuffled_passes(task.problems, cfg.seed))
        return stream, task.reward, suites

    names = list(cfg.eval_suites) or list(SUITES)
    suites = {name: suite_problems(name, size=eval_limit) for name in names}
    held_out_size = max(SUITE_SIZE, eval_limit)
    stream = ProblemStream(lambda: iter_training_problems(cfg.seed, cfg.families, suite_size=held_out_size))

    def reward(problem: Problem, completion: str) -> float:
        return get_task(problem.family).reward(problem, completion)

    return stream, reward, suites


def encode_prompts(tokenizer, problems: list[Problem], chat_template: bool, max_tokens: int) -> list[list[int]]:
    """Token ids of each prompt (with the tokenizer's special tokens or chat template), last `max_tokens` kept."""
    out = []
    for problem in problems:
        if chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = tokenizer(problem.prompt)["input_ids"]
        out.append(list(ids)[-max_tokens:])
    return out
