"""`MathTask`: real math problems from a local file, scored with math-verify.

The prompt asks for the final answer in `\\boxed{}` (the template is configurable; `{problem}`
marks where the problem text goes, and no other braces are interpreted, so `\\boxed{}` can be
written as is). The reference answer is parsed as if boxed; the completion is parsed by
math-verify's default extraction (boxed answers first, then LaTeX and plain expressions), so
`\\boxed{1/2}`, `0.5` and `\\frac{1}{2}` agree.

Timeouts. math-verify's own timeout uses `signal.alarm`, which only works in the main thread,
and its `parse` refuses to run in other threads with it on. We switch it off
(`parsing_timeout=None`, `timeout_seconds=None`) and run each check in a daemon thread that we
wait on for `timeout_s` seconds. A check that times out or raises scores 0 and is counted
(`timeouts`, `errors` in the batch metrics and in `MathTask.stats`); training never stops for
it. A timed-out check cannot be killed: its daemon thread runs on in the background until
sympy returns (it does not block interpreter exit).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from mtprl.tasks.base import Problem
from mtprl.tasks.math_data import read_math_rows

DEFAULT_TEMPLATE = (
    "Solve the following math problem step by step. "
    "Put the final answer in \\boxed{}.\n\nProblem: {problem}\n\nSolution:"
)
Status = Literal["correct", "wrong", "no_answer", "timeout", "error"]
# A checker returns True/False for a verdict, or None when the completion holds no answer.
Checker = Callable[[str, str], "bool | None"]


def _not_timeout_notice(record: logging.LogRecord) -> bool:
    return "Timeout is disabled" not in record.getMessage()


@functools.lru_cache(maxsize=None)
def _quiet_timeout_notice() -> None:
    """Drop math-verify's "Timeout is disabled" notice: `call_with_timeout` is the timeout it asks for."""
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_not_timeout_notice)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    from math_verify import parse

    _quiet_timeout_notice()
    text = gold if ("\\boxed" in gold or "$" in gold) else f"\\boxed{{{gold}}}"
    parsed = parse(text, parsing_timeout=None, raise_on_error=True)
    if not parsed:
        raise ValueError(f"math-verify cannot parse the reference answer {gold!r}")
    return tuple(parsed)


def math_verify_check(gold: str, completion: str) -> bool | None:
    """Does `completion` state an answer equal to `gold`? None when it states none.

    Signal-free (usable from any thread); it has no timeout of its own, see `call_with_timeout`.
    """
    from math_verify import parse, verify

    _quiet_timeout_notice()
    predicted = parse(completion, parsing_timeout=None, raise_on_error=True)
    if not predicted:
        return None
    return bool(verify(list(_parse_gold(gold)), predicted, timeout_seconds=None, raise_on_error=True))


def call_with_timeout(fn: Callable[..., Any], args: tuple, timeout_s: float) -> tuple[str, Any]:
    """Run `fn(*args)` in a daemon thread: ("ok", value), ("error", exception) or ("timeout", None)."""
    outcome: list[tuple[str, Any]] = []

    def target() -> None:
        try:
            outcome.append(("ok", fn(*args)))
        except Exception as err:  # the checker's failure is data for the metrics, not a crash
            outcome.append(("error", err))

    worker = threading.Thread(target=target, name="mtprl-math-check", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return outcome[0] if outcome else ("timeout", None)


class MathTask:
    """Math problems from a local JSONL / Parquet file or saved dataset, verified by math-verify.

    path: the data (see `mtprl.tasks.math_data`); None builds an empty task for `make_problem`.
    problem_key / answer_key: column names. template: prompt text with a `{problem}` slot.
    timeout_s: seconds allowed per check. checker: (gold, completion) -> bool | None, by default
    `math_verify_check`; replace it to use another verifier.
    """

    name = "math"

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        problem_key: str = "problem",
        answer_key: str = "answer",
        split: str | None = None,
        limit: int | None = None,
        template: str = DEFAULT_TEMPLATE,
        timeout_s: float = 5.0,
        checker: Checker = math_verify_check,
    ) -> None:
        if "{problem}" not in template:
            raise ValueError("MathTask template must contain '{problem}' where the problem text goes")
        if not timeout_s > 0:
            raise ValueError(f"MathTask timeout_s must be > 0 seconds, got {timeout_s}")
        self.template, self.timeout_s, self.checker = template, float(timeout_s), checker
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.problems: list[Problem] = []
        if path is not None:
            rows = read_math_rows(path, problem_key, answer_key, split, limit)
            self.problems = [self.make_problem(q, a, source=str(path), row=r) for r, q, a in rows]

    def __repr__(self) -> str:
        return f"MathTask({len(self.problems)} problems, timeout_s={self.timeout_s})"

    def make_problem(self, question: str, answer: str, **meta: Any) -> Problem:
        """A Problem whose prompt is the template filled with `question`."""
        return Problem(
            prompt=self.template.replace("{problem}", question),
            answer=str(answer).strip(),
            solution="",
            family=self.name,
            difficulty=0,
            meta={"question": question, **meta},
        )

    def check(self, problem: Problem, completion: str) -> Status:
        """The verdict on one completion; timeouts and checker crashes are verdicts too."""
        kind, value = call_with_timeout(self.checker, (problem.answer, completion), self.timeout_s)
        if kind == "ok":
            status: Status = "no_answer" if value is None else ("correct" if value else "wrong")
        else:
            status = kind  # type: ignore[assignment]
        with self._lock:
            self.stats[status] += 1
        return status

    def reward(self, problem: Problem, completion: str) -> float:
        """1.0 when math-verify finds the completion's answer equal to the reference, else 0.0."""
        return 1.0 if self.check(problem, completion) == "correct" else 0.0

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> tuple[list[float], dict[str, float]]:
        """Rewards and metrics for a batch: reward_mean, accuracy, parsed_rate, timeouts, errors."""
        if len(problems) != len(completions):
            raise ValueError(f"got {len(problems)} problems but {len(completions)} completions; pass one each")
        statuses = [self.check(p, c) for p, c in zip(problems, completions)]
        counts = Counter(statuses)
        n = max(len(statuses), 1)
        rewards = [1.0 if s == "correct" else 0.0 for s in statuses]
        metrics = {
            "reward_mean": sum(rewards) / n,
            "accuracy": counts["correct"] / n,
            "parsed_rate": (counts["correct"] + counts["wrong"]) / n,
            "timeouts": float(counts["timeout"]),
            "errors": float(counts["error"]),
        }
        return rewards, metrics
