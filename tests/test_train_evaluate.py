"""The trainer's evaluation: sizes honoured (intermediate vs final), standard errors, per-problem files."""

import json

import pytest

from mtprl.model import build_tiny_model, build_tokenizer
from mtprl.tasks import suite_problems
from mtprl.tasks.scoring import average_of_suites, suite_accuracy
from mtprl.train import TrainConfig
from mtprl.train.distributed import Dist
from mtprl.train.evaluate import eval_size, evaluate, write_problem_results

pytestmark = pytest.mark.usefixtures("one_thread")


def _reward(problem, text):
    return float(len(text) % 2 == 0)  # a random model's lengths vary: some samples "right", some not


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    model = build_tiny_model(tok, num_mtp_layers=1, seed=0, hidden_size=32, num_layers=1, num_heads=2,
                             num_kv_heads=1)
    suites = {name: suite_problems(name, size=6) for name in ("add-easy", "sort-hard")}
    cfg = TrainConfig(steps=5, eval_limit=2, final_eval_limit=6, eval_k=3, max_new_tokens=5, eval_temperature=1.0)
    return model, tok, suites, cfg


def test_intermediate_and_final_sizes_are_honoured(setup, tmp_path):
    model, tok, suites, cfg = setup
    assert (eval_size(cfg, 1), eval_size(cfg, 5)) == (2, 6)
    for step, size in ((1, 2), (5, 6)):
        values, detail = evaluate(model, tok, suites, _reward, cfg, step, Dist())
        assert values["eval_n/problems"] == size and values["eval_n/samples"] == 3
        for name in suites:
            assert len(detail[name]["correct"]) == size and len(detail[name]["greedy"]) == size
            assert all(0 <= c <= 3 for c in detail[name]["correct"]) and detail[name]["samples"] == 3
        path = write_problem_results(tmp_path, step, detail)
        assert path.name == f"step-{step}.json" and json.loads(path.read_text())["suites"] == detail
    # the intermediate problems are the first ones of the final set: the same prompts, seeded the same way
    values, detail = evaluate(model, tok, suites, _reward, cfg, 1, Dist(), size=6)
    assert values["eval_n/problems"] == 6


def test_logged_accuracies_and_standard_errors_follow_the_per_problem_results(setup):
    model, tok, suites, cfg = setup
    values, detail = evaluate(model, tok, suites, _reward, cfg, 5, Dist())
    pairs = []
    for name, result in detail.items():
        acc, se = suite_accuracy(result["correct"], 3)
        assert values[f"eval/{name}/avg@3"] == pytest.approx(acc) and values[f"eval_se/{name}/avg@3"] == pytest.approx(se)
        g, gse = suite_accuracy(result["greedy"], 1)
        assert values[f"eval/{name}/greedy"] == pytest.approx(g) and values[f"eval_se/{name}/greedy"] == pytest.approx(gse)
        pairs.append((acc, se))
    mean, se = average_of_suites(pairs)
    assert values["eval/avg/avg@3"] == pytest.approx(mean) and values["eval_se/avg/avg@3"] == pytest.approx(se)
    assert 0 < sum(sum(r["correct"]) for r in detail.values()) < 2 * 6 * 3  # the check above is not all zeros
    # habits: a random model copies neither the reference trace nor the shortcut
    assert values["habit/add-easy/reference"] == 0.0 and values["habit/add-easy/shortcut"] == 0.0


def test_final_eval_limit_below_eval_limit_is_refused():
    from mtprl.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="final_eval_limit"):
        build_config(TrainConfig, {"eval_limit": 8, "final_eval_limit": 4})
