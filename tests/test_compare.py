"""`mtprl compare` / `mtprl demo`: a miniature experiment end to end, re-use, and bad settings."""

import json
import re
from pathlib import Path

import pytest
import yaml

from mtprl.compare import CompareConfig, DemoConfig, plan_runs, run_compare, run_state
from mtprl.config import ConfigError, build_config
from mtprl.model import build_tiny_model, build_tokenizer
from mtprl.pretrain.cache import weights_hash

REGIMES = ["frozen", "detach", "ce", "policy", "occ"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tok = build_tokenizer()
    build_tiny_model(tok, hidden_size=32, num_layers=1, seed=0).save_pretrained(path, tokenizer=tok)
    return path


def _mini(base_dir, out, **kw):
    sets = [f"model={base_dir}", "prompts_per_step=2", "group_size=2", "mini_batches=2", "eval_limit=2",
            "final_eval_limit=0", "eval_k=1", "max_new_tokens=8", "exact_every=1", "progress=false", "eval_every=0"]
    values = {"regimes": REGIMES, "seeds": [0], "steps": 1, "output_dir": str(out), "set": sets, **kw}
    return build_config(CompareConfig, values)


def _final_eval(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"][-1]


@pytest.mark.slow
def test_miniature_demo_report_matches_metrics_files(base_dir, tmp_path, capsys):
    cfg = _mini(base_dir, tmp_path / "exp", workers=2)
    summary = run_compare(cfg)
    printed = capsys.readouterr().out
    report = (tmp_path / "exp" / "report" / "report.md").read_text()
    suites = ["add-easy", "add-hard", "expr-easy", "expr-hard", "sort-easy", "sort-hard"]
    for regime in REGIMES:
        assert re.search(rf"^\| ?{regime} ", report, re.M), f"{regime} missing from report.md"
        assert regime in printed
        final = _final_eval(tmp_path / "exp" / "runs" / f"{regime}-seed0")
        for suite in suites:
            assert suite in report
            assert summary["accuracy"]["avg@1"][regime][suite]["mean"] == pytest.approx(
                final[f"eval/{suite}/avg@1"])
        assert summary["extras"][regime]["eval/mtp_top1"]["mean"] == pytest.approx(final["eval/mtp_top1"])
        # accuracy can be 0 for an untrained model, so also check a number that is not: the wall time
        wall = json.loads((tmp_path / "exp" / "runs" / f"{regime}-seed0" / "summary.json").read_text())["wall_time"]
        assert wall > 0 and summary["extras"][regime]["wall_time"]["mean"] == pytest.approx(wall)
        assert f"{wall:.1f}" in printed
    pngs = list((tmp_path / "exp" / "report").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000 for p in pngs)
    # The base was evaluated once, at the final sizes, and shared: no run evaluated step 0 itself, yet every
    # run's curve starts at the base's row; the report carries the base's weights hash and each run's gain.
    base = json.loads((tmp_path / "exp" / "base" / "eval.json").read_text())
    assert base["weights_hash"] == weights_hash(base_dir) and base["weights_hash"] in report
    assert base["values"]["eval_n/problems"] == 2 and (tmp_path / "exp" / "base" / "evals" / "step-0.json").is_file()
    for regime in REGIMES:
        rows = [json.loads(line) for line in (tmp_path / "exp" / "runs" / f"{regime}-seed0" / "metrics.jsonl")
                .read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "eval"] == [1]
        gain = summary["gain"]["avg@1"][regime]["avg"]
        final = _final_eval(tmp_path / "exp" / "runs" / f"{regime}-seed0")
        assert gain["mean"] == pytest.approx(final["eval/avg/avg@1"] - base["values"]["eval/avg/avg@1"])
    assert "## Gain over the base" in report and "## Base model" in report
    # A second call re-uses every finished run and the base evaluation instead of running them again.
    stamp = (tmp_path / "exp" / "base" / "eval.json").stat().st_mtime_ns
    again = run_compare(cfg)
    assert "5 re-used, 0 to run" in capsys.readouterr().out
    assert again["accuracy"] == summary["accuracy"]
    assert (tmp_path / "exp" / "base" / "eval.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_changed_settings_on_a_finished_run_are_refused(base_dir, tmp_path):
    cfg = _mini(base_dir, tmp_path / "exp", regimes=["detach"], workers=1)
    run_compare(cfg)
    (name, tc), = plan_runs(cfg)
    assert run_state(tc) == "done"
    changed = _mini(base_dir, tmp_path / "exp", regimes=["detach"], mtp_coef=0.5)
    with pytest.raises(ConfigError, match=r"holds a run with other settings \(mtp_coef: 0.1 there, 0.5 now\)"):
        run_state(plan_runs(changed)[0][1])


@pytest.mark.parametrize("values, message", [
    ({"regimes": ["detach", "nope"]}, "unknown regime 'nope'"),
    ({"seeds": [1, 1]}, "seeds must be one or more distinct integers"),
    ({"workers": 0}, "workers must be >= 1"),
    ({"train_config": "/no/such.yaml"}, "train_config '/no/such.yaml' does not exist"),
    ({"regimes_x": ["occ"]}, "unknown config key 'regimes_x'"),
])
def test_bad_compare_settings_fail_fast(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(CompareConfig, values)


def test_bad_shared_train_settings_fail_before_any_run(tmp_path):
    cfg = build_config(CompareConfig, {"output_dir": str(tmp_path), "set": ["group_size=1"]})
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        plan_runs(cfg)
    cfg = build_config(CompareConfig, {"output_dir": str(tmp_path), "set": ["regime=occ"]})
    with pytest.raises(ConfigError, match=r"compare sets itself: regime \(set per run from --regimes\)"):
        plan_runs(cfg)
    assert not any(tmp_path.iterdir())


def test_demo_defaults_cover_the_five_regimes_with_one_seed():
    cfg = build_config(DemoConfig, {})
    assert cfg.regimes == REGIMES and cfg.seeds == [0]
    runs = plan_runs(cfg)
    assert [tc.regime for _, tc in runs] == REGIMES
    # identical settings apart from the regime
    dicts = [{k: v for k, v in vars(tc).items() if k not in ("regime", "output_dir")} for _, tc in runs]
    assert all(d == dicts[0] for d in dicts)


def test_set_refuses_every_setting_compare_owns(tmp_path):
    """Finding 6: `--set mtp_coef=0.5 steps=7 occ_estimator=ratio-of-sums resume=none` ran with compare's values."""
    cfg = build_config(CompareConfig, {"output_dir": str(tmp_path), "set": [
        "mtp_coef=0.5", "steps=7", "occ_estimator=ratio-of-sums", "resume=none", "lr=0.01"]})
    with pytest.raises(ConfigError) as err:
        plan_runs(cfg)
    message = str(err.value)
    for key, why in [("steps", "--steps"), ("mtp_coef", "--mtp-coef"), ("occ_estimator", "--occ-estimator"),
                     ("resume", "resumes unfinished runs")]:
        assert f"{key} (" in message and why in message, key
    assert "lr" not in message
    train_config = tmp_path / "shared.yaml"
    train_config.write_text("seed: 3\noverwrite: false\n")
    cfg = build_config(CompareConfig, {"output_dir": str(tmp_path), "train_config": str(train_config)})
    with pytest.raises(ConfigError, match=r"seed \(set per run from --seeds\); overwrite \("):
        plan_runs(cfg)
    assert not any(p for p in tmp_path.iterdir() if p != train_config)


def test_set_honours_every_other_setting(tmp_path):
    sets = ["lr=0.01", "group_size=4", "kl_coef=0.05", "progress=true", "eval_every=3", "occ_clip=[-1, 1]"]
    cfg = build_config(CompareConfig, {"output_dir": str(tmp_path), "set": sets, "workers": 2, "steps": 9,
                                       "mtp_coef": 0.5, "regimes": ["detach", "occ"], "seeds": [0]})
    runs = plan_runs(cfg)
    for name, tc in runs:
        assert (tc.lr, tc.group_size, tc.kl_coef, tc.progress, tc.eval_every, tc.occ_clip) == (
            0.01, 4, 0.05, True, 3, [-1.0, 1.0])
        assert (tc.steps, tc.mtp_coef, tc.regime, tc.resume) == (9, 0.5, name.split("-")[0], "auto")
    # What a child process is asked to run is the run's config, nothing changed on the way.
    from mtprl.compare import _child_command

    command, _ = _child_command(runs[0][1], threads=1)
    requested = build_config(type(runs[0][1]), yaml.safe_load(Path(command[-1]).read_text()))
    assert requested == runs[0][1]
    # Without a word from the user, runs in child processes show no progress bar in their train.log.
    quiet = plan_runs(build_config(CompareConfig, {"output_dir": str(tmp_path), "workers": 2}))
    assert all(tc.progress is False for _, tc in quiet)


def test_bad_data_fails_before_the_base_is_pretrained(tmp_path, monkeypatch):
    """Finding 1 for compare/demo: the data is read before the shared base is pre-trained (or found)."""
    import mtprl.pretrain as pretrain
    from mtprl.errors import UserError

    def no_pretraining(*args, **kwargs):
        raise AssertionError("pre-training started before the data was checked")

    monkeypatch.setattr(pretrain, "ensure_base_model", no_pretraining)
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "1 + 1"}\n')
    cfg = build_config(CompareConfig, {"output_dir": str(tmp_path / "exp"), "regimes": ["detach"], "seeds": [0],
                                       "set": [f"data={data}", "eval_suites=[]"]})
    with pytest.raises(UserError, match="row 1, column 'answer' is missing"):
        run_compare(cfg)
    assert not (tmp_path / "exp").exists()


def test_the_shared_base_evaluation_is_redone_when_its_sampling_changes(base_dir, tmp_path):
    import dataclasses

    from mtprl.compare import evaluate_base

    (_, tc), = plan_runs(_mini(base_dir, tmp_path / "exp", regimes=["detach"], workers=1))
    first = evaluate_base(tc, tmp_path / "base")
    assert evaluate_base(tc, tmp_path / "base") == first  # the same settings: the saved evaluation, as it was
    # rollout_rng decides which responses the base's samples are; a saved batch-mode evaluation is not re-used
    other = evaluate_base(dataclasses.replace(tc, rollout_rng="prompt"), tmp_path / "base")
    assert first["settings"]["rollout_rng"] == "batch" and other["settings"]["rollout_rng"] == "prompt"
    assert other["wall_time"] != first["wall_time"]
