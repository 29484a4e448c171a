"""The families' shortcut traces: hand-checked examples, and right exactly where the shortcut's rule says."""

import pytest

from mtprl.tasks import AdditionTask, ModExprTask, Problem, SortTask, get_task
from mtprl.tasks.modexpr import apply_op, left_to_right, render


def test_addition_shortcut_drops_the_carry_by_hand():
    task = AdditionTask()
    problem = Problem("27+58=?\n", "85", "", "add", 1, {"a": 27, "b": 58, "op": "+"})
    assert task.shortcut(problem) == "7+8+0=15 -> 5\n2+5+0=7 -> 75\n#### 75"
    assert task.reward(problem, task.shortcut(problem)) == 0.0
    # 52-38: 2-8 borrows, the shortcut does not pass the borrow on: 5-3-0=2 -> 24 instead of 14
    problem = Problem("52-38=?\n", "14", "", "add", 1, {"a": 52, "b": 38, "op": "-"})
    assert task.shortcut(problem) == "2-8-0=-6 -> 4\n5-3-0=2 -> 24\n#### 24"


def test_expr_shortcut_reads_left_to_right_by_hand():
    task = ModExprTask()
    tree = ["+", 2, ["*", 3, 4]]  # 2+3*4 = 2+5 = 0 (mod 7); left to right: (2+3)*4 = 20 = 6
    assert render(tree) == "2+3*4" and left_to_right(tree) == ["*", ["+", 2, 3], 4]
    problem = Problem("2+3*4 mod 7=?\n", "0", "", "expr", 1, {"tree": tree, "modulus": 7})
    assert task.shortcut(problem) == "2+3=5 -> 5*4\n5*4=6 -> 6\n#### 6"
    # brackets are ignored too: 3*(4+5) read as (3*4)+5
    assert left_to_right(["*", 3, ["+", 4, 5]]) == ["+", ["*", 3, 4], 5]


def test_sort_shortcut_skips_repeats_by_hand():
    task = SortTask()
    problem = Problem("sort 3 1 3 2\n", "1 2 3 3", "", "sort", 1, {"items": [3, 1, 3, 2]})
    assert task.shortcut(problem) == "1 3\n1 3\n1 2 3\n#### 1 2 3"
    assert task.reward(problem, task.shortcut(problem)) == 0.0


def _no_carry(a: int, b: int, op: str) -> bool:
    top, bottom = (max(a, b), min(a, b)) if op == "-" else (a, b)
    xs, ys = str(top)[::-1], str(bottom)[::-1].ljust(len(str(top)), "0")
    carry = 0
    for j, (x, y) in enumerate(zip(xs, ys)):
        value = int(x) + int(y) + carry if op == "+" else int(x) - int(y) - carry
        if j < len(xs) - 1 and (value >= 10 or value < 0):
            return False
        carry = int(value >= 10) if op == "+" else int(value < 0)
    return True


def _evaluate(tree, modulus=7):
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    return apply_op(op, _evaluate(left), _evaluate(right), modulus)


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_shortcuts_are_right_exactly_where_their_rule_holds(difficulty):
    for name in ("add", "expr", "sort"):
        task = get_task(name)
        problems = task.generate(difficulty, 300, difficulty)
        right = [task.reward(p, task.shortcut(p)) == 1.0 for p in problems]
        if name == "add":
            rule = [_no_carry(p.meta["a"], p.meta["b"], p.meta["op"]) for p in problems]
        elif name == "expr":
            rule = [str(_evaluate(left_to_right(p.meta["tree"]))) == p.answer for p in problems]
        else:
            rule = [len(set(p.meta["items"])) == len(p.meta["items"]) for p in problems]
        assert right == rule, name
        # "right on part of the problems": neither never nor always
        assert 0.05 < sum(right) / len(right) < 0.95, (name, difficulty, sum(right) / len(right))
        for p in problems:  # same line format: every shortcut ends with one answer line
            assert task.shortcut(p).splitlines()[-1].startswith("#### ")
