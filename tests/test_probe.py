"""The finite-difference probe: untouched run state, updates that differ only in λ, the estimates, the command."""

import copy
import hashlib
import json
import math
import random

import pytest
import torch

from conftest import small_train_config
from mtprl.cli import main
from mtprl.probe.core import (
    copy_state, finite_differences, forced_lambda, importance_rewards, probe_updates, sample_fresh,
)
from mtprl.report.probe import agreement, bootstrap_ci, sign_agreement
from mtprl.train import train
from mtprl.train.distributed import Dist
from mtprl.train.metrics import read_metrics
from mtprl.train.update import build_optimizer, minibatch_update, prepare_log_probs

from test_train_update import base_model, fresh, make_batch, make_config  # noqa: F401  (fixture)


def flat(model):
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def started(base, regime):
    """A model, optimiser and scheduler after one update, and the batch with its last mini-batch's rows."""
    cfg = make_config(regime, mini_batches=2, micro_batch_size=8)
    model = fresh(base, regime)
    optimizer, scheduler = build_optimizer(model, cfg)
    batch = make_batch(num_heads=1)
    prepare_log_probs(model, None, batch, cfg, step=1, dist=Dist())
    minibatch_update(model, optimizer, scheduler, batch, torch.arange(8), cfg, Dist())
    return cfg, model, optimizer, scheduler, batch, torch.arange(8, 16)


def test_probe_leaves_model_optimiser_scheduler_and_rng_bit_exact(base_model):
    cfg, model, optimizer, scheduler, batch, rows = started(base_model, "occ")
    params = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    sched_state = copy.deepcopy(scheduler.state_dict())
    torch_rng, py_rng = torch.get_rng_state(), random.getstate()
    out = probe_updates(model, optimizer, scheduler, batch, rows, cfg, Dist(), [-2.0, 0.0, 2.0],
                        lambda m: [torch.rand(()).item(), random.random()])  # a measure that draws random numbers
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    saved, now = opt_state["state"], optimizer.state_dict()["state"]
    assert saved.keys() == now.keys()
    assert all(torch.equal(saved[i][key], now[i][key]) for i in saved for key in ("exp_avg", "exp_avg_sq", "step"))
    assert scheduler.state_dict() == sched_state
    assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == py_rng
    # each arm's measure drew the same random numbers: the RNG is restored around the probe only
    assert out[0]["values"] != out[1]["values"]


def test_the_three_updates_differ_only_in_lambda(base_model):
    """Under occ, the probe's update at λ is the same update as the fixed-λ policy regime at λ₀ = λ
    (same surrogate head, same detach switches), from the same state: equal parameters bit for bit."""
    cfg, model, optimizer, scheduler, batch, rows = started(base_model, "occ")
    arms = probe_updates(model, optimizer, scheduler, batch, rows, cfg, Dist(), [-0.5, 0.0, 0.5], flat)
    assert [a["metrics"]["mtp/0/lambda"] for a in arms] == [-0.5, 0.0, 0.5]
    for arm in arms:
        clone, opt, sched = copy_state(model, optimizer, scheduler, cfg)
        policy = make_config("policy", mini_batches=2, micro_batch_size=8, mtp_coef=arm["lambda"])
        minibatch_update(clone, opt, sched, batch, rows, policy, Dist())
        assert torch.equal(arm["values"], flat(clone))
    assert not torch.equal(arms[0]["values"], arms[2]["values"])
    with pytest.raises(ValueError, match="no MTP term"):
        forced_lambda(make_config("frozen"), 1.0, 1)


def test_finite_differences_by_hand():
    out = finite_differences([0.0, 1.0], [0.5, 1.0], [1.0, 1.0], c=0.5)
    assert out["dJ_dlambda"] == pytest.approx(0.5)  # per prompt (1 − 0)/1 = 1 and 0
    assert out["dJ_dlambda_se"] == pytest.approx(0.5)  # sd of [1, 0] = √0.5, / √2
    assert out["curvature"] == pytest.approx(0.0) and out["J_zero"] == pytest.approx(0.75)


def test_importance_weights_are_one_at_the_sampling_state(tiny_checkpoint):
    from mtprl.model import MTPCausalLM, load_tokenizer
    from mtprl.tasks import suite_problems

    model = MTPCausalLM.from_pretrained(tiny_checkpoint).eval()
    tok = load_tokenizer(tiny_checkpoint)
    cfg = make_config("occ", max_new_tokens=6)
    problems = suite_problems("add-easy", size=3)
    reward = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    calls = iter(reward)
    sampled = sample_fresh(model, tok, problems, lambda p, t: next(calls), cfg, 2, seed=1, dist=Dist())
    assert importance_rewards(model, sampled, cfg) == pytest.approx([0.5, 1.0, 0.0], abs=1e-9)  # rows are prompt-major


def _fresh_with_weights(rewards, prompt_index, weights):
    """A Fresh whose importance weights are `weights` for a model stub whose sequence log-probs are log w."""
    from mtprl.probe.core import Fresh

    n = len(rewards)
    return Fresh(batch=None, rewards=torch.tensor(rewards, dtype=torch.float64),
                 prompt_index=torch.tensor(prompt_index), log_prob=torch.zeros(n, dtype=torch.float64),
                 prompts=max(prompt_index) + 1), torch.tensor(weights, dtype=torch.float64).log()


def test_leave_one_out_baseline_by_hand(monkeypatch):
    import mtprl.probe.core as core

    # problem 0: rewards 1, 0, 1 with w 1.2, 0.9, 1.0; problem 1: all 1 with w 1.1, 0.8, 1.3
    fresh, log_w = _fresh_with_weights([1, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [1.2, 0.9, 1.0, 1.1, 0.8, 1.3])
    monkeypatch.setattr(core, "sequence_log_probs", lambda model, batch, cfg: log_w)
    plain = importance_rewards(None, fresh, None, baseline="none")
    assert plain == pytest.approx([(1.2 + 1.0) / 3, (1.1 + 0.8 + 1.3) / 3])
    assert importance_rewards(None, fresh, None) == plain  # the default
    loo = importance_rewards(None, fresh, None, baseline="leave-one-out")
    # problem 0: b = (0+1)/2, (1+1)/2, (1+0)/2 = 0.5, 1, 0.5; (r − b)·w + b = 0.5·1.2+0.5, −1·0.9+1, 0.5·1.0+0.5
    assert loo[0] == pytest.approx((1.1 + 0.1 + 1.0) / 3)
    assert loo[1] == pytest.approx(1.0)  # every response scores 1: exactly 1 whatever the weights
    ones, _ = _fresh_with_weights([1, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [1.0] * 6)
    monkeypatch.setattr(core, "sequence_log_probs", lambda model, batch, cfg: torch.zeros(6, dtype=torch.float64))
    assert importance_rewards(None, ones, None, baseline="leave-one-out") == pytest.approx([2 / 3, 1.0])  # w = 1


def test_leave_one_out_baseline_keeps_the_estimate_unbiased(monkeypatch):
    """E over responses sampled from π₀ of the leave-one-out estimate equals E_λ[r] (exact enumeration)."""
    import itertools

    import mtprl.probe.core as core

    p0 = [0.5, 0.3, 0.2]  # π₀ over three responses, rewards 1, 0, 1; π_λ = q
    q = [0.6, 0.25, 0.15]
    r = [1.0, 0.0, 1.0]
    expected = {"none": 0.0, "leave-one-out": 0.0}
    for draw in itertools.product(range(3), repeat=3):  # three responses to one problem
        prob = math.prod(p0[i] for i in draw)
        fresh, log_w = _fresh_with_weights([r[i] for i in draw], [0, 0, 0], [q[i] / p0[i] for i in draw])
        monkeypatch.setattr(core, "sequence_log_probs", lambda model, batch, cfg, log_w=log_w: log_w)
        for name in expected:
            expected[name] += prob * importance_rewards(None, fresh, None, baseline=name)[0]
    truth = sum(qi * ri for qi, ri in zip(q, r))  # 0.75
    assert expected["none"] == pytest.approx(truth) and expected["leave-one-out"] == pytest.approx(truth)


def test_leave_one_out_baseline_refuses_a_single_response(monkeypatch):
    import mtprl.probe.core as core

    fresh, log_w = _fresh_with_weights([1, 0], [0, 1], [1.0, 1.0])
    monkeypatch.setattr(core, "sequence_log_probs", lambda model, batch, cfg: log_w)
    with pytest.raises(ValueError, match="leave-one-out baseline needs >= 2 responses"):
        importance_rewards(None, fresh, None, baseline="leave-one-out")


def test_agreement_statistics_by_hand():
    share, n = sign_agreement([1.0, -2.0, 3.0, 0.0], [0.5, 1.0, 2.0, 1.0])
    assert (share, n) == (2 / 3, 3)  # the zero predictor is left out
    rows = [{"dJ_dlambda": d, "proxy_mean_ratio": p} for d, p in [(1, 1), (2, 2), (3, 3), (4, 5)]]
    stats = agreement(rows, resamples=200)["proxy_mean_ratio"]
    assert stats["spearman"] == pytest.approx(1.0) and stats["sign_agreement"] == 1.0
    assert stats["spearman_ci"][1] == pytest.approx(1.0)
    lo, hi = bootstrap_ci([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], lambda a, b: sum(a) / len(a), resamples=500)
    assert 1 <= lo < 3.5 < hi <= 6


def _tree_hash(path):
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and "probe" not in p.relative_to(path).parts):
        digest.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return digest.hexdigest()


def test_probe_command_on_a_tiny_run(tiny_checkpoint, tmp_path, one_thread, capsys):
    """The probe reproduces the run's own state: at checkpoint 1 its held-out terms are the run's step-2 ones."""
    run_dir = train(small_train_config(tiny_checkpoint, tmp_path / "run", regime="occ", steps=2, save_every=1,
                                       exact_every=1))
    before = _tree_hash(run_dir)
    assert main(["probe", str(run_dir), "--checkpoints", "1", "--prompts", "2", "--samples", "2",
                 "--fresh-prompts", "2", "--bootstrap", "10"]) == 0
    assert _tree_hash(run_dir) == before  # the run directory is untouched apart from probe/
    row, = [json.loads(line) for line in (run_dir / "probe" / "probe.jsonl").read_text().splitlines()]
    step2 = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"][1]
    assert row["step"] == 1 and row["lambda_used"] == [[-1.0], [0.0], [1.0]]
    assert row["heldout_pdot"] == pytest.approx(step2["heldout/0/pdot"], rel=1e-5)
    assert row["heldout_dot"] == pytest.approx(step2["heldout/0/dot"], rel=1e-5)
    assert {"dJ_dlambda", "dJ_dlambda_se", "curvature", "curvature_se", "fresh_pdot", "time/total_s"} <= row.keys()
    assert (run_dir / "probe" / "summary.json").is_file() and (run_dir / "probe" / "report.md").is_file()
    # the run's report reads the probe rows: its probe figure, and claim (5) from the probe (one row: too few)
    from mtprl.report import build_report

    summary = build_report([run_dir], tmp_path / "report")
    assert {f["file"]: f["written"] for f in summary["figures"]}["probe.png"]
    claim5 = summary["claims"][4]
    assert "finite-difference probe" in claim5["claim"] and claim5["evidence"]["rows"] == 1
    capsys.readouterr()
    # bad input is refused in one line before any model is loaded
    assert main(["probe", str(run_dir), "--checkpoints", "7"]) == 2
    assert "no checkpoint at step(s) [7]" in capsys.readouterr().err
    assert main(["probe", str(run_dir), "--coef", "0"]) == 2
    assert "coef must be > 0" in capsys.readouterr().err
    assert main(["probe", str(tmp_path)]) == 2
    assert "has no config.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_probe_of_a_sharded_checkpoint_equals_that_of_the_unsharded_run(tiny_checkpoint, tmp_path, one_thread):
    """A 1-process `parallel: fsdp` run trains as `ddp` does; probing its DCP checkpoint (optimiser state loaded
    into the whole model's optimiser) gives the unsharded run's row, preconditioned terms included."""
    rows = {}
    for parallel in ("ddp", "fsdp"):
        run_dir = train(small_train_config(tiny_checkpoint, tmp_path / parallel, regime="occ", parallel=parallel,
                                           steps=2, save_every=1, exact_every=1))
        assert main(["probe", str(run_dir), "--checkpoints", "1", "--prompts", "2", "--samples", "2",
                     "--fresh-prompts", "2", "--bootstrap", "10"]) == 0
        rows[parallel] = json.loads((run_dir / "probe" / "probe.jsonl").read_text())
    for key in ("same_pdot", "fresh_pdot", "J_plus", "J_minus", "proxy_mean_ratio", "exact_slope"):
        assert rows["fsdp"][key] == pytest.approx(rows["ddp"][key], rel=1e-4, abs=1e-9), key
    assert rows["ddp"]["same_pdot"] != 0.0


def test_probe_config_refuses_a_leave_one_out_baseline_with_one_sample(tmp_path):
    from mtprl.config import ConfigError
    from mtprl.probe.command import ProbeConfig

    (tmp_path / "config.yaml").write_text("regime: occ\n")
    ProbeConfig(run_dir=str(tmp_path), samples=1).validate()  # fine without the baseline (the default)
    with pytest.raises(ConfigError, match="baseline leave-one-out needs samples >= 2"):
        ProbeConfig(run_dir=str(tmp_path), samples=1, baseline="leave-one-out").validate()
    with pytest.raises(ConfigError, match="baseline must be leave-one-out or none"):
        ProbeConfig(run_dir=str(tmp_path), baseline="mean").validate()
