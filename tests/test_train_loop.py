"""`mtprl train` end to end on CPU with a tiny random model: every regime, metrics, resume after a kill.

The runs use `conftest.small_train_config` (overlong shaping gives a random model non-zero advantages).
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import small_train_config as small_config
from mtprl.config import build_config
from mtprl.losses import MTP_REGIMES, fixed_coefficient, register_regime, surrogate_head
from mtprl.train import TrainConfig, train
from mtprl.train.checkpoint import latest_checkpoint
from mtprl.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"time", "time/rollout_s", "time/update_s", "rollout/tokens_per_s"}
REGIMES = list(MTP_REGIMES)  # the built-in ones, before any test registers its own
TRAIN_KEYS = {
    "reward/mean", "acc", "response_len/mean", "entropy", "pg/loss", "pg/clipfrac_low", "pg/clipfrac_high",
    "pg/approx_kl", "grad_norm", "lr", "mtp/0/lambda", "mtp/0/lambda_first", "mtp/0/c_hat", "mtp/0/proxy_c_hat",
    "mtp/0/loss", "mtp/0/top1", "rollout/accept_rate", "sampling/draws",
}
EXACT_KEYS = {f"exact/0/{name}" for name in ("dot", "g_rl_sq", "g_mtp_sq", "cos", "slope", "proxy_c_hat")}
EVAL_KEYS = {"eval/add-easy/avg@2", "eval/add-easy/greedy", "eval/avg/avg@2", "eval/avg/greedy", "eval/mtp_top1"}


@pytest.fixture(scope="module")
def regime_runs(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("regimes")
    return {regime: train(small_config(tiny_checkpoint, root / regime, regime=regime)) for regime in REGIMES}


@pytest.mark.slow  # the fixture trains one run per regime
@pytest.mark.parametrize("regime", REGIMES)
def test_short_run_per_regime_logs_every_field(regime_runs, regime):
    run_dir = regime_runs[regime]
    records = read_metrics(run_dir / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    eval_records = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train_records] == [1, 2] and [r["step"] for r in eval_records] == [2]
    for r in train_records:
        assert TRAIN_KEYS <= r.keys(), TRAIN_KEYS - r.keys()
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for k, v in r.items() if k != "kind")
    assert EXACT_KEYS <= train_records[0].keys() and not EXACT_KEYS & train_records[1].keys()  # exact_every=2
    assert EVAL_KEYS <= eval_records[0].keys()
    assert train_records[0]["grad_norm"] > 0  # the overlong shaping gave non-zero advantages
    lam, spec = train_records[0]["mtp/0/lambda_first"], MTP_REGIMES[regime]
    if not spec.has_term or spec.uses_drift:
        assert lam == 0.0  # no term, or λ from δ = ℓ − ℓ° = 0 on the first mini-batch
    if spec.coefficient is fixed_coefficient:
        assert lam == pytest.approx(0.1)  # λ₀ / K with λ₀ = 0.1, K = 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["regime"] == regime and summary["seed"] == 0 and EVAL_KEYS <= summary["eval"].keys()
    saved = build_config(TrainConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved.regime == regime and saved.mtp_coef == 0.1 and saved.occ_estimator == "mean-ratio"
    assert latest_checkpoint(run_dir / "checkpoints").name == "step-00000002"


@pytest.mark.slow
def test_every_regime_logs_the_same_train_keys(regime_runs):
    keys = {regime: set(read_metrics(d / "metrics.jsonl")[0]) for regime, d in regime_runs.items()}
    assert all(k == keys["occ"] for k in keys.values()), {r: k ^ keys["occ"] for r, k in keys.items()}


def sign_proxy(x, k):
    """A toy coefficient rule: λ_k = (λ₀ / K)·sign(ĉ_k), ĉ_k the OCC proxy."""
    c_hat = torch.sign(x.proxy[k])
    return x.base * c_hat, c_hat


@pytest.fixture
def toy_regime():
    yield register_regime("toy-sign", surrogate_head, sign_proxy, uses_drift=True)
    del MTP_REGIMES["toy-sign"]


@pytest.mark.slow  # compares with the regime runs
def test_a_registered_regime_trains_through_mtprl_train(tiny_checkpoint, tmp_path, toy_regime, regime_runs):
    run_dir = train(small_config(tiny_checkpoint, tmp_path / "toy", regime="toy-sign"))
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    assert set(records[0]) == set(read_metrics(regime_runs["occ"] / "metrics.jsonl")[0])  # the same keys
    # λ_first = 0 (δ ≡ 0, sign 0); the mean over the 2 mini-batches is (0 ± 0.1) / 2.
    assert all(r["mtp/0/lambda_first"] == 0.0 for r in records)
    assert all(abs(r["mtp/0/lambda"]) == pytest.approx(0.05) for r in records)
    assert records[0]["grad_norm"] > 0 and records[0]["mtp/grad_norm"] > 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["regime"] == "toy-sign"


@pytest.mark.slow
def test_every_regime_sees_the_same_first_rollout(regime_runs):
    firsts = [read_metrics(d / "metrics.jsonl")[0] for d in regime_runs.values()]
    keys = ("reward/mean", "acc", "response_len/mean", "response_len/max", "sampling/draws", "batch/reward_mean")
    assert len({tuple(r[k] for k in keys) for r in firsts}) == 1


@pytest.mark.slow
def test_occ_lambda_zero_first_then_nonzero(regime_runs):
    for r in read_metrics(regime_runs["occ"] / "metrics.jsonl"):
        if r["kind"] == "train":
            assert r["mtp/0/lambda_first"] == 0.0 and r["mtp/0/lambda"] != 0.0


@pytest.mark.slow
def test_occ_exact_logs_the_exact_slope(regime_runs):
    first = read_metrics(regime_runs["occ-exact"] / "metrics.jsonl")[0]
    # λ = (λ₀ / K) · ĉ with ĉ the exact slope of that micro-batch; the proxy is logged beside it.
    assert first["mtp/0/c_hat"] != 0.0 and "mtp/0/proxy_c_hat" in first
    assert first["mtp/0/lambda_first"] != 0.0  # unlike the proxy, the exact slope acts from the first step


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.slow
def test_kill_after_checkpoint_and_resume_gives_the_uninterrupted_metrics(tiny_checkpoint, tmp_path):
    over = dict(regime="occ", steps=5, save_every=1, eval_every=2, max_new_tokens=24, overlong_buffer=23)
    straight = train(small_config(tiny_checkpoint, tmp_path / "straight", **over))

    run_dir = tmp_path / "killed"
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(yaml.safe_dump(vars(small_config(tiny_checkpoint, run_dir, **over))))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "mtprl", "train", "--config", str(cfg_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = run_dir / "checkpoints" / "step-00000002" / "COMPLETE"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert marker.exists(), err.decode()[-2000:]
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"

    resumed = train(small_config(tiny_checkpoint, run_dir, resume="auto", **over))
    expected = _comparable(read_metrics(straight / "metrics.jsonl"))
    assert [(r["kind"], r["step"]) for r in expected] == [("train", 1), ("train", 2), ("eval", 2), ("train", 3),
                                                           ("train", 4), ("eval", 4), ("train", 5), ("eval", 5)]
    assert _comparable(read_metrics(resumed / "metrics.jsonl")) == expected


def test_math_data_file_trains_and_evaluates(tiny_checkpoint, tmp_path):
    """--data (a MathTask from JSONL) and --eval-data (one suite per file, named by its stem)."""
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    data, held_out = tmp_path / "train.jsonl", tmp_path / "mini-gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    cfg = small_config(tiny_checkpoint, tmp_path / "run", data=str(data), eval_data=[str(held_out)], eval_suites=[],
                       steps=1, max_prompt_tokens=24, exact_every=0)
    records = read_metrics(train(cfg) / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("eval", 1)]
    assert {"eval/mini-gsm/avg@2", "eval/mini-gsm/greedy", "eval/avg/greedy"} <= records[1].keys()
    assert records[0]["acc"] == 0.0  # a random model does not solve them; the rewards come from math-verify


def test_drafting_rollouts_log_acceptance(tiny_checkpoint, tmp_path):
    cfg = small_config(tiny_checkpoint, tmp_path / "run", regime="policy", draft_tokens=2, steps=1, exact_every=0)
    train_record, eval_record = read_metrics(train(cfg) / "metrics.jsonl")
    assert 0.0 < train_record["rollout/accept_rate"] <= 1.0 and "rollout/accept_rate/1" in train_record
    assert 0.0 <= eval_record["eval/mtp_accept"] <= 1.0 and "eval/mtp_top1" not in eval_record
