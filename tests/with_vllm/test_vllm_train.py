"""`mtprl train` with `rollout_backend: vllm`: after each update the engine samples with the new weights,
the trunk and the MTP layers each shown separately (a skipped push of either would fail here)."""

import copy

import pytest
import torch

from mtprl.rollout import SamplingParams, generate
from mtprl.train.config import TrainConfig
from mtprl.train.loop import _start
from mtprl.train.rundir import RunLock

GREEDY = SamplingParams(max_new_tokens=32, temperature=0, draft_tokens=1)


def _rows(r):
    return [r.response_ids[i, : r.lengths[i]].tolist() for i in range(len(r.lengths))]


@pytest.fixture(scope="module")
def run_after_one_step(base_dir, tmp_path_factory, suite_prompts):
    out = tmp_path_factory.mktemp("train") / "run"
    cfg = TrainConfig(model=str(base_dir), rollout_backend="vllm", draft_tokens=1, regime="ce", mtp_coef=5.0,
                      steps=2, prompts_per_step=4, group_size=4, mini_batches=2, micro_batch_size=8,
                      max_new_tokens=32, max_draws=1, lr=1e-2, eval_every=0, eval_at_start=False, eval_limit=2,
                      eval_suites=["add-easy"], exact_every=0, save_every=0, output_dir=str(out), progress=False,
                      tis_cap=2.0, vllm_kv_cache_mb=64)
    lock = RunLock(out)
    run, _ = _start(cfg, lock)
    start = copy.deepcopy(run.model).eval()
    first = run.step(1)
    second = run.step(2)  # sampled by the engine after the first update's push
    yield run, start, first, second
    lock.release()


def test_second_rollout_comes_from_the_updated_trunk(run_after_one_step, suite_prompts):
    run, start, first, second = run_after_one_step
    tok = run.tokenizer
    now = generate(run.model, suite_prompts, GREEDY, eos_token_id=tok.eos_token_id)
    stale_trunk = copy.deepcopy(run.model)
    stale_trunk.base.load_state_dict(start.base.state_dict())
    stale = generate(stale_trunk, suite_prompts, GREEDY, eos_token_id=tok.eos_token_id)
    assert _rows(now) != _rows(stale)  # the update moved the trunk, so a skipped push would show
    assert _rows(run.engine.generate(suite_prompts, GREEDY, tok.eos_token_id)) == _rows(now)
    # The trainer's recomputed log-probs of step 2's samples equal the engine's: it sampled the updated policy.
    assert second["rollout/mismatch_abs"] < 1e-4 and second["rollout/mismatch_ratio_out"] == 0.0
    assert first["rollout/mismatch_abs"] < 1e-4
    assert second["tis/weight_mean"] == pytest.approx(1.0, abs=1e-3)


def test_second_rollout_drafts_with_the_updated_mtp_layers(run_after_one_step, suite_prompts):
    run, start, first, second = run_after_one_step
    tok = run.tokenizer
    now = generate(run.model, suite_prompts, GREEDY, eos_token_id=tok.eos_token_id).metrics["rollout/accept_rate/0"]
    stale_mtp = copy.deepcopy(run.model)
    stale_mtp.mtp_layers.load_state_dict(start.mtp_layers.state_dict())
    stale = generate(stale_mtp, suite_prompts, GREEDY, eos_token_id=tok.eos_token_id).metrics["rollout/accept_rate/0"]
    print("acceptance now / stale MTP:", now, stale)
    assert abs(now - stale) > 0.02  # the update moved the MTP layers enough to show in acceptance
    got = run.engine.generate(suite_prompts, GREEDY, tok.eos_token_id).metrics["rollout/accept_rate/0"]
    assert got == pytest.approx(now, abs=0.005)
    for record in (first, second):
        assert 0 < record["rollout/accept_rate/0"] <= 1 and "time/weight_sync_s" in record


def test_trained_checkpoint_served_by_a_fresh_engine_accepts_as_ours(run_after_one_step):
    """The trainer's checkpoint, exported and served anew (`mtprl acceptance`), drafts as our engine does greedily."""
    from mtprl.integrations.vllm_acceptance import measure

    run = run_after_one_step[0]
    run.save(2)
    figures = measure(run.run_dir, ["add-easy", "expr-easy", "sort-easy"], limit=8, draft_tokens=1, samples=2,
                      max_new_tokens=32)
    assert figures["model"].endswith("model") and figures["prompts"] == 24
    greedy = figures["greedy"]
    assert greedy["vllm"]["accept_rate/0"] == pytest.approx(greedy["ours"]["accept_rate/0"], abs=0.01)
    for engine in ("ours", "vllm"):
        assert 0 < figures["sampled"][engine]["accept_rate/0"] <= 1
