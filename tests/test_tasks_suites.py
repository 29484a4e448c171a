"""Held-out suites: stable names, fixed by seed, distinct prompts, disjoint from training data."""

import pytest

from mtprl.tasks import SUITES, get_task, eval_suites, iter_training_problems, suite_problems, training_problems
from mtprl.tasks.suites import SUITE_LEVELS, SUITE_SIZE

EXPECTED_NAMES = ["add-easy", "add-hard", "expr-easy", "expr-hard", "sort-easy", "sort-hard"]


def test_six_suites_with_stable_names_and_sizes():
    suites = eval_suites()
    assert list(suites) == EXPECTED_NAMES
    for name, problems in suites.items():
        family, difficulty = SUITES[name]
        assert len(problems) == SUITE_SIZE >= 200
        assert len({p.prompt for p in problems}) == len(problems)
        assert {(p.family, p.difficulty) for p in problems} == {(family, difficulty)}


def test_suites_fixed_by_seed():
    assert eval_suites(seed=3, size=50) == eval_suites(seed=3, size=50)
    assert suite_problems("add-easy", seed=3, size=50) != suite_problems("add-easy", seed=4, size=50)
    # a smaller suite is not required to be a prefix, but the same (seed, size) is always the same
    assert [p.prompt for p in eval_suites(names=["sort-hard"])["sort-hard"]] == [
        p.prompt for p in suite_problems("sort-hard")
    ]


def test_training_problems_never_contain_a_suite_prompt():
    held_out = {p.prompt for problems in eval_suites().values() for p in problems}
    # Unfiltered generation does hit suite prompts, so the filter matters: expr at difficulty 1
    # has at most 7**3 * 3**2 * 2 = 6174 prompts, 256 of them held out (about 4%).
    raw = get_task("expr").generate(0, 3000, 1)
    assert held_out & {p.prompt for p in raw}
    train = training_problems(seed=0, n=20000)
    assert len(train) == 20000
    assert not held_out & {p.prompt for p in train}
    assert {p.family for p in train} == {"add", "expr", "sort"}
    # by default each family trains at its suites' levels: the same distribution as the suites, other prompts
    assert {(p.family, p.difficulty) for p in train} == set(SUITES.values())
    wider = training_problems(seed=0, n=300, difficulties=[1, 2, 3])
    assert {p.difficulty for p in wider} == {1, 2, 3}


def test_training_stream_is_deterministic_and_filters_custom_suites():
    a = training_problems(seed=1, n=200, families=["expr"], difficulties=[1])
    b = training_problems(seed=1, n=200, families=["expr"], difficulties=[1])
    assert a == b
    small = {p.prompt for p in eval_suites(seed=5, size=100)["expr-easy"]}
    stream = iter_training_problems(seed=2, families=["expr"], difficulties=[1], suite_seed=5, suite_size=100)
    assert not small & {next(stream).prompt for _ in range(3000)}


def test_unknown_suite_and_empty_families():
    with pytest.raises(KeyError, match="unknown suite 'mul-easy'"):
        suite_problems("mul-easy")
    with pytest.raises(ValueError, match="at least one family"):
        training_problems(seed=0, n=1, families=[])
    assert SUITE_LEVELS == {"add": (1, 2), "expr": (1, 2), "sort": (2, 3)}
