"""Family "sort": sort a list of digits by insertion, one inserted item per line.

Difficulty d sorts d + 3 digits. Each line shows the sorted prefix after inserting the next item
(the first item alone is not written):

    sort 5 3 8 1 3
    3 5
    3 5 8
    1 3 5 8
    1 3 3 5 8
    #### 1 3 3 5 8

An item is inserted before the first larger item of the prefix, i.e. after equal ones. Answers
are compared as integer lists (spaces or commas, optional brackets; see `normalize_integer_list`).

Shortcut ("skip repeats"): an item already in the prefix is not inserted again (its line repeats
the prefix), so the answer loses the repeats. It is right exactly when the digits are distinct:
30% of the 5-digit lists, 15% of the 6-digit ones.
"""

from __future__ import annotations

import random

from mtprl.tasks.answers import normalize_integer_list
from mtprl.tasks.base import CorruptionKind, Problem, TaskFamily, final_line


def insert_sorted(prefix: list[int], item: int) -> list[int]:
    """`prefix` with `item` placed before its first element larger than `item`."""
    at = next((i for i, x in enumerate(prefix) if x > item), len(prefix))
    return prefix[:at] + [item] + prefix[at:]


def insertion_lines(items: list[int], slip: tuple[int, int] | None = None,
                    repeats: bool = True) -> tuple[list[str], list[int]]:
    """Lines of the insertion sort of `items` and the final list.

    `slip=(k, position)` inserts item k (k >= 1) at `position` instead of its sorted place; later
    items are inserted by the usual rule into the now unsorted prefix. With `repeats=False` an
    item already in the prefix is skipped (the "skip repeats" shortcut).
    """
    prefix, lines = items[:1], []
    for k in range(1, len(items)):
        if not repeats and items[k] in prefix:
            pass
        elif slip is not None and slip[0] == k:
            at = min(slip[1], len(prefix))
            prefix = prefix[:at] + [items[k]] + prefix[at:]
        else:
            prefix = insert_sorted(prefix, items[k])
        lines.append(" ".join(map(str, prefix)))
    return lines, prefix


def wrong_list(answer: list[int], rng: random.Random) -> list[int]:
    """A list other than `answer`: two adjacent different items swapped, else one item changed."""
    pairs = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    out = list(answer)
    if pairs:
        i = rng.choice(pairs)
        out[i], out[i + 1] = out[i + 1], out[i]
    else:
        i = rng.randrange(len(out))
        out[i] = (out[i] + 1) % 10
    return out


class SortTask(TaskFamily):
    """Insertion sort of (difficulty + 3) digits."""

    name = "sort"
    normalize = staticmethod(normalize_integer_list)

    def make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        self.check_difficulty(difficulty)
        items = [rng.randrange(10) for _ in range(difficulty + 3)]
        lines, result = insertion_lines(items)
        assert result == sorted(items)
        answer = " ".join(map(str, result))
        return Problem(
            prompt="sort " + " ".join(map(str, items)) + "\n",
            answer=answer,
            solution="\n".join(lines) + "\n" + final_line(answer),
            family=self.name,
            difficulty=difficulty,
            meta={"items": items},
        )

    def shortcut(self, problem: Problem) -> str:
        lines, result = insertion_lines(problem.meta["items"], repeats=False)
        return "\n".join(lines) + "\n" + final_line(" ".join(map(str, result)))

    def corrupt(self, problem: Problem, rng: random.Random, kind: CorruptionKind) -> str:
        items = problem.meta["items"]
        if kind == "step":
            for _ in range(8):
                k = rng.randrange(1, len(items))
                lines, result = insertion_lines(items, (k, rng.randrange(k + 1)))
                if " ".join(map(str, result)) != problem.answer:
                    return "\n".join(lines) + "\n" + final_line(" ".join(map(str, result)))
        lines, result = insertion_lines(items)
        return "\n".join(lines) + "\n" + final_line(" ".join(map(str, wrong_list(result, rng))))
