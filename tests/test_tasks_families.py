"""Generated task families: determinism, hand-checked traces, rewards of correct and corrupted traces."""

import random
import string

import pytest

from mtprl.tasks import TASKS, AdditionTask, ModExprTask, Problem, SortTask, get_task
from mtprl.tasks.addition import written_solution
from mtprl.tasks.modexpr import evaluation_lines, render
from mtprl.tasks.sorting import insertion_lines

ALLOWED = set(string.printable[:95]) | {"\n"}  # chr 32..126 and newline (the char tokenizer)
FAMILIES = sorted(TASKS)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_generation_is_deterministic_per_seed(name, difficulty):
    task = get_task(name)
    first = task.generate(123, 20, difficulty)
    again = task.generate(123, 20, difficulty)
    other = task.generate(124, 20, difficulty)
    assert first == again
    assert [p.prompt for p in first] != [p.prompt for p in other]
    assert task.generate(random.Random(5), 3, difficulty) == task.generate(5, 3, difficulty)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_solutions_score_one_and_corruptions_score_zero(name, difficulty):
    task = get_task(name)
    rng = random.Random(difficulty)
    for problem in task.generate(difficulty, 60, difficulty):
        assert problem.family == name and problem.difficulty == difficulty
        assert problem.prompt.endswith("\n")
        assert problem.solution.splitlines()[-1] == f"#### {problem.answer}"
        assert set(problem.text) <= ALLOWED
        assert task.reward(problem, problem.solution) == 1.0
        for kind in ("step", "answer"):
            corrupted = task.corrupt(problem, rng, kind)
            assert corrupted != problem.solution
            assert task.reward(problem, corrupted) == 0.0, (problem, kind, corrupted)
        # every step right, final answer replaced: scores 0
        steps = problem.solution.rsplit("\n", 1)[0]
        wrong = task.corrupt(problem, rng, "answer").rsplit("\n", 1)[1]
        assert task.reward(problem, steps + "\n" + wrong) == 0.0


def test_step_corruption_keeps_a_wrong_step_not_only_a_wrong_answer():
    # 27+58: correct columns "7+8+0=15 -> 5", "2+5+1=8 -> 85". A step slip changes a column line.
    task = AdditionTask()
    problem = Problem("27+58=?\n", "85", "", "add", 1, {"a": 27, "b": 58, "op": "+"})
    corrupted = task.corrupt(problem, random.Random(0), "step")
    correct_lines = written_solution(27, 58, "+")[0].splitlines()
    assert sum(a != b for a, b in zip(corrupted.splitlines(), correct_lines)) >= 1
    assert corrupted.splitlines()[:-1] != correct_lines


def test_addition_trace_by_hand():
    # 983+969: 3+9=12 write 2 carry 1; 8+6+1=15 write 5 carry 1; last column 9+9+1=19 written whole.
    steps, answer = written_solution(983, 969, "+")
    assert steps == "3+9+0=12 -> 2\n8+6+1=15 -> 52\n9+9+1=19 -> 1952\n"
    assert answer == "1952"


def test_subtraction_trace_by_hand_with_swap_and_leading_zeros():
    # 4738-5957 = -(5957-4738): 7-8=-1 borrow (write 9); 5-3-1=1; 9-7=2; 5-4=1 -> -1219.
    steps, answer = written_solution(4738, 5957, "-")
    assert steps == "-(5957-4738)\n7-8-0=-1 -> 9\n5-3-1=1 -> 19\n9-7-0=2 -> 219\n5-4-0=1 -> 1219\n"
    assert answer == "-1219"
    # 1000-999: every column borrows, the digits written are 0001, the answer is 1.
    steps, answer = written_solution(1000, 999, "-")
    assert steps.splitlines()[-1] == "1-0-1=0 -> 0001"
    assert answer == "1"


def test_modexpr_trace_by_hand():
    # (3+5)*4-2 mod 7: 3+5=8=1; 1*4=4; 4-2=2.
    tree = ["-", ["*", ["+", 3, 5], 4], 2]
    assert render(tree) == "(3+5)*4-2"
    lines, value = evaluation_lines(tree, 7)
    assert lines == ["3+5=1 -> 1*4-2", "1*4=4 -> 4-2", "4-2=2 -> 2"] and value == 2
    # right operand of equal precedence keeps its brackets: 6-(2-5) = 6-4 = 2 (2-5=-3=4 mod 7).
    tree = ["-", 6, ["-", 2, 5]]
    assert render(tree) == "6-(2-5)"
    assert evaluation_lines(tree, 7) == (["2-5=4 -> 6-4", "6-4=2 -> 2"], 2)
    # leftmost ready operation first: 2*3+4*5 -> 6+4*5 -> 6+6 -> 5 (20=6, 12=5 mod 7).
    tree = ["+", ["*", 2, 3], ["*", 4, 5]]
    assert evaluation_lines(tree, 7) == (["2*3=6 -> 6+4*5", "4*5=6 -> 6+6", "6+6=5 -> 5"], 5)


def test_sort_trace_by_hand():
    lines, result = insertion_lines([5, 3, 8, 1, 3])
    assert lines == ["3 5", "3 5 8", "1 3 5 8", "1 3 3 5 8"]
    assert result == [1, 3, 3, 5, 8]


@pytest.mark.parametrize(
    "task, problem, completion, expected",
    [
        (AdditionTask(), Problem("1+1=?\n", "-5", "", "add", 1), "#### -005", 1.0),
        (AdditionTask(), Problem("1+1=?\n", "-5", "", "add", 1), "####  -5 ", 1.0),
        (AdditionTask(), Problem("1+1=?\n", "-5", "", "add", 1), "#### 5", 0.0),
        (AdditionTask(), Problem("1+1=?\n", "-5", "", "add", 1), "-5", 0.0),
        (ModExprTask(), Problem("3+6 mod 7=?\n", "2", "", "expr", 1), "#### 9", 0.0),  # residue must be canonical
        (SortTask(), Problem("sort 2 1\n", "1 2", "", "sort", 1), "#### [1, 2]", 1.0),
        (SortTask(), Problem("sort 2 1\n", "1 2", "", "sort", 1), "#### 2 1", 0.0),
        (SortTask(format_reward=0.1), Problem("sort 2 1\n", "1 2", "", "sort", 1), "#### 2 1", 0.1),
        (SortTask(format_reward=0.1), Problem("sort 2 1\n", "1 2", "", "sort", 1), "#### two", 0.0),
    ],
)
def test_reward_table(task, problem, completion, expected):
    assert task.reward(problem, completion) == expected


def test_score_batch_metrics():
    task = AdditionTask()
    p = Problem("2+2=?\n", "4", "", "add", 1)
    rewards, metrics = task.score([p, p, p, p], ["#### 4", "#### 04", "#### 5", "none"])
    assert rewards == [1.0, 1.0, 0.0, 0.0]
    assert metrics == {"reward_mean": 0.5, "accuracy": 0.5, "parsed_rate": 0.75}


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="difficulty must be an integer >= 1"):
        AdditionTask().generate(0, 5, 0)
    with pytest.raises(ValueError, match="prime"):
        ModExprTask(modulus=9)
    with pytest.raises(ValueError, match="format_reward"):
        SortTask(format_reward=1.5)
    with pytest.raises(KeyError, match="unknown task family 'mul'"):
        get_task("mul")
    assert get_task("expr", modulus=11).modulus == 11
