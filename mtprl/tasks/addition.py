"""Family "add": multi-digit addition and subtraction, written column by column.

Difficulty d uses (d + 1)-digit operands. The trace works from the rightmost column, writes the
column's sum (or difference, with the incoming carry or borrow as the third term) and the partial
result so far:

    4738-5957=?
    -(5957-4738)
    7-8-0=-1 -> 9
    5-3-1=1 -> 19
    9-7-0=2 -> 219
    5-4-0=1 -> 1219
    #### -1219

A negative column difference means "borrow 1 and write the difference + 10"; a column sum of 10
or more carries 1, and the last column writes its whole sum. A subtraction with a smaller first
operand is rewritten as the negated difference on the first line. Leading zeros of a difference
(1000-999 writes 0001) are dropped in the answer.

Shortcut ("no carry"): the same column lines, but the carry or borrow is never passed on (every
column's third term is 0). It is right exactly when no column before the last carries or borrows:
about half of the 2-digit problems, a third of the 3-digit ones.
"""

from __future__ import annotations

import random

from mtprl.tasks.answers import normalize_integer
from mtprl.tasks.base import CorruptionKind, Problem, TaskFamily, final_line

Fault = tuple[int, int]  # (column index from the right, error added to that column's result)


def column_lines(top: int, bottom: int, op: str, fault: Fault | None = None,
                 carry: bool = True) -> tuple[list[str], str]:
    """The column lines of `top op bottom` (top >= bottom for "-") and the digits written.

    With `fault=(j, e)` column j's sum/difference is written off by `e`, and the carry or borrow
    and the later columns follow the wrong value, as a person making one slip would. With
    `carry=False` no carry or borrow is passed to the next column (the "no carry" shortcut).
    """
    xs = str(top)[::-1]
    ys = str(bottom)[::-1].ljust(len(xs), "0")
    lines, partial, carry_in = [], "", 0
    for j, (x, y) in enumerate(zip(xs, ys)):
        error = fault[1] if fault is not None and fault[0] == j else 0
        if op == "+":
            value = min(max(int(x) + int(y) + carry_in + error, 0), 19)
            carry_out, digit = divmod(value, 10)
            partial = (str(value) if j == len(xs) - 1 else str(digit)) + partial
        else:
            value = min(max(int(x) - int(y) - carry_in + error, -10), 9)
            carry_out, digit = int(value < 0), value % 10
            partial = str(digit) + partial
        lines.append(f"{x}{op}{y}{op}{carry_in}={value} -> {partial}")
        carry_in = carry_out if carry else 0
    return lines, partial


def written_solution(a: int, b: int, op: str, fault: Fault | None = None, carry: bool = True) -> tuple[str, str]:
    """(trace without the final line, answer written) for `a op b`, optionally with one slip or no carries."""
    head: list[str] = []
    top, bottom, sign = a, b, ""
    if op == "-" and a < b:
        top, bottom, sign = b, a, "-"
        head = [f"-({b}-{a})"]
    lines, digits = column_lines(top, bottom, op, fault, carry)
    answer = normalize_integer(sign + digits)
    return "\n".join(head + lines) + "\n", answer  # type: ignore[return-value]


def wrong_integer(answer: str, rng: random.Random) -> str:
    """A different integer near `answer` (off by 1, 2 or 10 either way)."""
    return str(int(answer) + rng.choice((-10, -2, -1, 1, 2, 10)))


class AdditionTask(TaskFamily):
    """Column addition/subtraction of two (difficulty + 1)-digit numbers."""

    name = "add"
    normalize = staticmethod(normalize_integer)

    def make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        self.check_difficulty(difficulty)
        digits = difficulty + 1
        a, b = (rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in range(2))
        op = rng.choice("+-")
        steps, answer = written_solution(a, b, op)
        assert int(answer) == (a + b if op == "+" else a - b)
        return Problem(
            prompt=f"{a}{op}{b}=?\n",
            answer=answer,
            solution=steps + final_line(answer),
            family=self.name,
            difficulty=difficulty,
            meta={"a": a, "b": b, "op": op},
        )

    def shortcut(self, problem: Problem) -> str:
        a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
        steps, answer = written_solution(a, b, op, carry=False)
        return steps + final_line(answer)

    def corrupt(self, problem: Problem, rng: random.Random, kind: CorruptionKind) -> str:
        a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
        if kind == "step":
            columns = len(str(max(a, b)))
            for _ in range(8):
                fault = (rng.randrange(columns), rng.choice((-1, 1)))
                steps, answer = written_solution(a, b, op, fault)
                if answer != problem.answer:
                    return steps + final_line(answer)
        steps, _ = written_solution(a, b, op)
        return steps + final_line(wrong_integer(problem.answer, rng))
