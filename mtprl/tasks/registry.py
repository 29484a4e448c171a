"""Registry of the generated task families, by name."""

from __future__ import annotations

from typing import Any

from mtprl.tasks.addition import AdditionTask
from mtprl.tasks.base import TaskFamily
from mtprl.tasks.modexpr import ModExprTask
from mtprl.tasks.sorting import SortTask

# name -> a default instance (format reward off). Use get_task(name, **options) for other options.
TASKS: dict[str, TaskFamily] = {
    "add": AdditionTask(),
    "expr": ModExprTask(),
    "sort": SortTask(),
}


def get_task(name: str, **options: Any) -> TaskFamily:
    """The family called `name`; with keyword options, a fresh instance built with them.

    Real math datasets are not in the registry: build `mtprl.tasks.MathTask(path, ...)`.
    """
    if name not in TASKS:
        hint = " (for a math dataset build mtprl.tasks.MathTask)" if name == "math" else ""
        raise KeyError(f"unknown task family '{name}'; known: {', '.join(sorted(TASKS))}{hint}")
    if not options:
        return TASKS[name]
    return type(TASKS[name])(**options)
