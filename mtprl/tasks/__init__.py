"""Verifiable tasks: generated reasoning families, held-out suites, and real math checking.

Generated families ("add", "expr", "sort") write problems with a step-by-step solution trace
ending in `#### <answer>` and own their reward (see `mtprl.tasks.base`). `eval_suites` gives the
six fixed held-out suites; `training_problems` / `iter_training_problems` give training problems
that never repeat a suite prompt. `MathTask` reads real problems from a local file and scores
`\\boxed{}` answers with math-verify under a thread-safe timeout.
"""

from mtprl.tasks.addition import AdditionTask
from mtprl.tasks.answers import ANSWER_MARKER, extract_answer, normalize_integer, normalize_integer_list
from mtprl.tasks.base import CORRUPTION_KINDS, Problem, TaskFamily
from mtprl.tasks.math_data import MathDataError, read_math_rows
from mtprl.tasks.math_task import DEFAULT_TEMPLATE, MathTask, call_with_timeout, math_verify_check
from mtprl.tasks.modexpr import ModExprTask
from mtprl.tasks.registry import TASKS, get_task
from mtprl.tasks.sorting import SortTask
from mtprl.tasks.suites import (
    SUITE_SEED,
    SUITE_SIZE,
    SUITES,
    TRAIN_DIFFICULTIES,
    eval_suites,
    iter_training_problems,
    suite_problems,
    training_problems,
)

__all__ = [
    "ANSWER_MARKER",
    "CORRUPTION_KINDS",
    "DEFAULT_TEMPLATE",
    "SUITES",
    "SUITE_SEED",
    "SUITE_SIZE",
    "TASKS",
    "TRAIN_DIFFICULTIES",
    "AdditionTask",
    "MathDataError",
    "MathTask",
    "ModExprTask",
    "Problem",
    "SortTask",
    "TaskFamily",
    "call_with_timeout",
    "eval_suites",
    "extract_answer",
    "get_task",
    "iter_training_problems",
    "math_verify_check",
    "normalize_integer",
    "normalize_integer_list",
    "read_math_rows",
    "suite_problems",
    "training_problems",
]
