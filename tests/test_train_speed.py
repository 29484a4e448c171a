"""Speed options of the training step against the unoptimised path: `reuse_rollout_log_probs`."""

import dataclasses

import pytest
import torch

from mtprl.config import ConfigError
from mtprl.model import build_tiny_model, build_tokenizer
from mtprl.train.config import TrainConfig
from mtprl.train.data import build_problems
from mtprl.train.distributed import Dist
from mtprl.train.rollouts import collect_batch
from mtprl.train.update import prepare_log_probs


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    model = build_tiny_model(tok).eval()
    cfg = TrainConfig(prompts_per_step=4, group_size=4, max_new_tokens=24, mini_batches=2, micro_batch_size=4,
                      dynamic_sampling=True, max_draws=2)
    stream, reward, _ = build_problems(cfg)
    batch, _ = collect_batch(model, tok, stream, reward, cfg, 1, Dist())
    return model, cfg, batch


def test_rollout_log_probs_as_old_log_probs_differ_by_rounding_only(setup):
    model, cfg, batch = setup
    prepare_log_probs(model, None, batch, cfg, 1, Dist())
    recomputed = batch.old_log_probs.clone()
    prepare_log_probs(model, None, batch, dataclasses.replace(cfg, reuse_rollout_log_probs=True), 1, Dist())
    reused = batch.old_log_probs
    mask = batch.loss_mask
    assert mask.sum() > 50 and torch.equal(reused[~mask], torch.zeros_like(reused[~mask]))
    assert torch.equal(reused[mask], batch.rollout_log_probs[mask])  # the sampler's own numbers, as documented
    assert (reused[mask] < 0).all()
    # Float rounding between the sampler's one-token forwards and the training layout's forward.
    assert (reused - recomputed).abs().max() < 1e-4


def test_reuse_needs_the_plain_softmax():
    TrainConfig(reuse_rollout_log_probs=True).validate()
    with pytest.raises(ConfigError, match="reuse_rollout_log_probs needs top_p 1 and top_k 0"):
        TrainConfig(reuse_rollout_log_probs=True, top_p=0.9).validate()
    with pytest.raises(ConfigError, match="top_k 0"):
        TrainConfig(reuse_rollout_log_probs=True, top_k=5).validate()
