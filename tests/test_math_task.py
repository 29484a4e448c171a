"""MathTask: local data loading, math-verify equivalences, timeouts and crashes, thread safety."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mtprl.tasks import MathDataError, MathTask, call_with_timeout, read_math_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def half_task(tmp_path):
    data = write_jsonl(tmp_path / "half.jsonl", [{"problem": "What is 1 divided by 2?", "answer": "0.5"}])
    return MathTask(data)


@pytest.mark.parametrize(
    "gold, completion, expected",
    [
        ("0.5", "So the result is \\boxed{1/2}.", 1.0),
        ("0.5", "\\boxed{\\frac{1}{2}}", 1.0),
        ("\\frac{1}{2}", "We get \\boxed{0.5}", 1.0),
        ("1/2", "The answer is $\\frac{1}{2}$", 1.0),
        ("0.5", "\\boxed{0.6}", 0.0),  # wrong answer
        ("0.5", "I do not know.", 0.0),  # no answer at all
        ("-3", "\\boxed{-3}", 1.0),
        ("\\sqrt{2}", "\\boxed{\\sqrt 2}", 1.0),
    ],
)
def test_math_verify_equivalences(gold, completion, expected):
    task = MathTask()
    assert task.reward(task.make_problem("q", gold), completion) == expected


def test_loads_jsonl_and_builds_boxed_prompts(half_task):
    (problem,) = half_task.problems
    assert problem.answer == "0.5" and problem.family == "math"
    assert "What is 1 divided by 2?" in problem.prompt and "\\boxed{}" in problem.prompt
    assert problem.meta["row"] == 1
    assert half_task.reward(problem, "\\boxed{1/2}") == 1.0


def test_custom_columns_template_and_numeric_answers(tmp_path):
    rows = [{"question": "2+3?", "solution": 5}, {"question": "7*6?", "solution": 42}]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    task = MathTask(data, problem_key="question", answer_key="solution", template="Q: {problem}\nA:", limit=1)
    assert [p.prompt for p in task.problems] == ["Q: 2+3?\nA:"]
    assert task.problems[0].answer == "5"
    with pytest.raises(ValueError, match="must contain '\\{problem\\}'"):
        MathTask(template="no slot")


def test_timeout_scores_zero_and_is_counted():
    release = threading.Event()

    def hanging_checker(gold, completion):
        release.wait(30)
        return True

    task = MathTask(timeout_s=0.2, checker=hanging_checker)
    problem = task.make_problem("q", "1")
    try:
        rewards, metrics = task.score([problem], ["\\boxed{1}"])
    finally:
        release.set()
    assert rewards == [0.0]
    assert metrics["timeouts"] == 1.0 and metrics["errors"] == 0.0 and metrics["accuracy"] == 0.0
    assert task.stats["timeout"] == 1


def test_checker_crash_scores_zero_and_is_counted():
    def crashing_checker(gold, completion):
        raise RecursionError("sympy blew up")

    task = MathTask(checker=crashing_checker)
    problem = task.make_problem("q", "1")
    rewards, metrics = task.score([problem, problem], ["\\boxed{1}", "\\boxed{2}"])
    assert rewards == [0.0, 0.0]
    assert metrics["errors"] == 2.0 and metrics["timeouts"] == 0.0


def test_unparseable_reference_is_an_error_not_a_crash():
    task = MathTask()
    problem = task.make_problem("q", "\\text{}")  # math-verify extracts nothing from it
    assert task.check(problem, "\\boxed{1}") == "error"


def test_call_with_timeout_outcomes():
    assert call_with_timeout(lambda x: x + 1, (1,), 5.0) == ("ok", 2)
    kind, err = call_with_timeout(lambda: 1 / 0, (), 5.0)
    assert kind == "error" and isinstance(err, ZeroDivisionError)


def test_works_from_worker_threads(half_task):
    # math-verify's signal-based timeout raises outside the main thread; ours must not.
    problem = half_task.problems[0]
    completions = ["\\boxed{1/2}", "\\boxed{0.5}", "\\boxed{3}", "none"] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        rewards = list(pool.map(lambda c: half_task.reward(problem, c), completions))
    assert rewards == [1.0, 1.0, 0.0, 0.0] * 4
    assert half_task.stats["error"] == 0


def test_malformed_jsonl_rows_name_file_row_and_column(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "answer": "1"}, {"problem": "no answer here"}])
    with pytest.raises(MathDataError, match=r"bad\.jsonl: row 2, column 'answer' is missing"):
        MathTask(data)
    data = write_jsonl(tmp_path / "empty.jsonl", [{"problem": "", "answer": "1"}])
    with pytest.raises(MathDataError, match=r"empty\.jsonl: row 1, column 'problem' must be a non-empty text"):
        read_math_rows(data)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "a", "answer": "1"}\n{"problem": \n')
    with pytest.raises(MathDataError, match=r"broken\.jsonl: row 2 is not valid JSON"):
        read_math_rows(broken)
    with pytest.raises(MathDataError, match="does not exist"):
        read_math_rows(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("problem,answer\n")
    with pytest.raises(MathDataError, match="unknown file type '.csv'"):
        read_math_rows(tmp_path / "data.csv")


def test_parquet_with_bad_row(tmp_path):
    import pyarrow as pa  # dev extra: a missing package fails the test rather than skipping it
    import pyarrow.parquet as pq
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"problem": ["1+1?", "2+2?"], "answer": ["2", "4"]}), good)
    assert [(r, a) for r, _, a in read_math_rows(good)] == [(1, "2"), (2, "4")]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"problem": ["1+1?", None], "answer": ["2", "4"]}), bad)
    with pytest.raises(MathDataError, match=r"bad\.parquet: row 2, column 'problem' must be a non-empty text"):
        read_math_rows(bad)


def test_saved_dataset_directory(tmp_path):
    import datasets
    rows = {"problem": ["What is 3/4 as a decimal?"], "answer": ["0.75"]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(MathDataError, match=r"splits \['test'\]; choose one with split="):
        MathTask(tmp_path / "dd")
    task = MathTask(tmp_path / "dd", split="test")
    assert task.reward(task.problems[0], "\\boxed{\\frac{3}{4}}") == 1.0
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    assert MathTask(tmp_path / "ds").problems[0].answer == "0.75"
