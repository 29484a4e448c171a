"""Family "expr": evaluate a small arithmetic expression modulo a prime, one operation per line.

Difficulty d uses d + 1 operators from + - * on digits 0..p-1 (p = 7 by default, so every value
stays one character long). Each line takes the leftmost operation whose operands are both
numbers, writes it with its value mod p, then the whole expression with that value in its place:

    (3+5)*4-2 mod 7=?
    3+5=1 -> 1*4-2
    1*4=4 -> 4-2
    4-2=2 -> 2
    #### 2

Writing the operation first keeps the arithmetic next to its operands (as the column lines of
"add" do), which a small model learns far more easily than computing inside the rewrite.

Expressions are printed with the fewest parentheses that keep the usual precedence and left
associativity, so the printed text parses back to the same tree. The answer is the canonical
residue in 0..p-1 (an equivalent residue such as 9 for 2 mod 7 is scored wrong).

Shortcut ("left to right"): the operations are done in the order they are written, ignoring
operator precedence and brackets (`left_to_right`); the lines look the same. It is right when the
written order is the evaluation order, or by chance (1 in 7) otherwise.
"""

from __future__ import annotations

import random
from typing import Union

from mtprl.tasks.answers import normalize_integer
from mtprl.tasks.base import CorruptionKind, Problem, TaskFamily, final_line

# A leaf is an int; an inner node is [op, left, right] (lists so that Problem.meta stays JSON).
Tree = Union[int, list]
PRECEDENCE = {"+": 1, "-": 1, "*": 2}


def random_tree(rng: random.Random, n_ops: int, modulus: int) -> Tree:
    """A random expression tree with `n_ops` operators and leaves in 0..modulus-1."""
    if n_ops == 0:
        return rng.randrange(modulus)
    left_ops = rng.randint(0, n_ops - 1)
    op = rng.choice("+-*")
    return [op, random_tree(rng, left_ops, modulus), random_tree(rng, n_ops - 1 - left_ops, modulus)]


def render(tree: Tree) -> str:
    """Infix text with minimal parentheses (right operand of equal precedence is bracketed)."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    left_text, right_text = render(left), render(right)
    if isinstance(left, list) and PRECEDENCE[left[0]] < PRECEDENCE[op]:
        left_text = f"({left_text})"
    if isinstance(right, list) and PRECEDENCE[right[0]] <= PRECEDENCE[op]:
        right_text = f"({right_text})"
    return f"{left_text}{op}{right_text}"


def apply_op(op: str, x: int, y: int, modulus: int) -> int:
    if op == "+":
        return (x + y) % modulus
    if op == "-":
        return (x - y) % modulus
    return (x * y) % modulus


def leftmost_ready(tree: list) -> tuple[str, int, int]:
    """(op, left, right) of the leftmost operation whose operands are both numbers."""
    op, left, right = tree
    if isinstance(left, int) and isinstance(right, int):
        return op, left, right
    return leftmost_ready(left if isinstance(left, list) else right)


def replace_leftmost(tree: list, value: int) -> Tree:
    """`tree` with its leftmost ready operation replaced by `value`."""
    op, left, right = tree
    if isinstance(left, int) and isinstance(right, int):
        return value
    if isinstance(left, list):
        return [op, replace_leftmost(left, value), right]
    return [op, left, replace_leftmost(right, value)]


def _leaves_and_ops(tree: Tree) -> list:
    """The numbers and operators of `render(tree)` in written order, brackets dropped."""
    if isinstance(tree, int):
        return [tree]
    op, left, right = tree
    return _leaves_and_ops(left) + [op] + _leaves_and_ops(right)


def left_to_right(tree: Tree) -> Tree:
    """The tree of a reader who does the operations of `render(tree)` in written order, ignoring
    operator precedence and brackets."""
    items = _leaves_and_ops(tree)
    out = items[0]
    for i in range(1, len(items), 2):
        out = [items[i], out, items[i + 1]]
    return out


def evaluation_lines(tree: Tree, modulus: int, slip: tuple[int, int] | None = None) -> tuple[list[str], int]:
    """One line per reduction and the final value.

    `slip=(step, error)` adds `error` (mod `modulus`) to the value computed at that step, as a
    one-off mistake; the later steps work on from the wrong value.
    """
    lines, step = [], 0
    while isinstance(tree, list):
        op, x, y = leftmost_ready(tree)
        value = apply_op(op, x, y, modulus)
        if slip is not None and slip[0] == step:
            value = (value + slip[1]) % modulus
        tree = replace_leftmost(tree, value)
        lines.append(f"{x}{op}{y}={value} -> {render(tree)}")
        step += 1
    return lines, tree


class ModExprTask(TaskFamily):
    """Step-by-step evaluation of (difficulty + 1)-operator expressions modulo a prime."""

    name = "expr"
    normalize = staticmethod(normalize_integer)

    def __init__(self, modulus: int = 7, format_reward: float = 0.0) -> None:
        super().__init__(format_reward)
        if modulus < 2 or any(modulus % k == 0 for k in range(2, int(modulus**0.5) + 1)):
            raise ValueError(f"expr: modulus must be a prime, got {modulus}")
        self.modulus = modulus

    def __repr__(self) -> str:
        return f"ModExprTask(modulus={self.modulus}, format_reward={self.format_reward})"

    def make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        self.check_difficulty(difficulty)
        tree = random_tree(rng, difficulty + 1, self.modulus)
        lines, value = evaluation_lines(tree, self.modulus)
        answer = str(value)
        return Problem(
            prompt=f"{render(tree)} mod {self.modulus}=?\n",
            answer=answer,
            solution="\n".join(lines) + "\n" + final_line(answer),
            family=self.name,
            difficulty=difficulty,
            meta={"tree": tree, "modulus": self.modulus},
        )

    def shortcut(self, problem: Problem) -> str:
        lines, value = evaluation_lines(left_to_right(problem.meta["tree"]), problem.meta["modulus"])
        return "\n".join(lines) + "\n" + final_line(str(value))

    def corrupt(self, problem: Problem, rng: random.Random, kind: CorruptionKind) -> str:
        tree, modulus = problem.meta["tree"], problem.meta["modulus"]
        if kind == "step":
            n_steps = len(evaluation_lines(tree, modulus)[0])
            for _ in range(8):
                slip = (rng.randrange(n_steps), rng.randrange(1, modulus))
                lines, value = evaluation_lines(tree, modulus, slip)
                if str(value) != problem.answer:
                    return "\n".join(lines) + "\n" + final_line(str(value))
        lines, _ = evaluation_lines(tree, modulus)
        wrong = (int(problem.answer) + rng.randrange(1, modulus)) % modulus
        return "\n".join(lines) + "\n" + final_line(str(wrong))
