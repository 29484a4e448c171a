"""Speed options of the training step against the unoptimised path: `reuse_rollout_log_probs`, `first_draws`,
`sort_micro_batches` (sorted, left-aligned forwards)."""

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
    # collected as for reuse_rollout_log_probs, which keeps the sampler's log-probs (same batch otherwise)
    batch, _ = collect_batch(model, tok, stream, reward, dataclasses.replace(cfg, reuse_rollout_log_probs=True), 1,
                             Dist())
    return model, cfg, batch


def test_rollout_log_probs_as_old_log_probs_differ_by_rounding_only(setup):
    model, cfg, batch = setup
    stream, reward, _ = build_problems(cfg)
    assert collect_batch(model, build_tokenizer(), stream, reward, cfg, 1, Dist())[0].rollout_log_probs is None
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


@pytest.mark.parametrize("first_draws, calls", [(1, 3), (2, 2), (3, 1)])
def test_first_draws_sample_together_and_use_the_same_problems(setup, monkeypatch, first_draws, calls):
    """With rewards all equal no group is mixed, so dynamic sampling makes all max_draws = 3 draws."""
    from mtprl.train import rollouts

    model, cfg, _ = setup
    cfg = dataclasses.replace(cfg, max_draws=3, first_draws=first_draws)
    seen = []

    def counting(model, prompts, params, **kwargs):
        seen.append(len(prompts))
        return generate(model, prompts, params, **kwargs)

    generate = rollouts.generate
    monkeypatch.setattr(rollouts, "generate", counting)
    stream, _, _ = build_problems(cfg)
    batch, metrics = collect_batch(model, model_tokenizer(), stream, lambda p, t: 1.0, cfg, 1, Dist())
    assert len(seen) == calls and sum(seen) == 3 * cfg.prompts_per_step and seen[0] == first_draws * 4
    assert stream.position == 3 * cfg.prompts_per_step and metrics["sampling/draws"] == 3.0
    assert batch.size == cfg.prompts_per_step * cfg.group_size
    # the batch is filled with the first draw's groups (all dropped, in draw order): the same prompts either way
    fresh, _, _ = build_problems(cfg)
    first = encode_first(fresh.take(cfg.prompts_per_step), cfg)
    assert [row[row != 0].tolist() for row in batch.input_ids[:: cfg.group_size, : batch.prompt_len]] == first


def model_tokenizer():
    return build_tokenizer()


def encode_first(problems, cfg):
    from mtprl.train.data import encode_prompts

    return encode_prompts(build_tokenizer(), problems, cfg.chat_template, cfg.max_prompt_tokens)


def test_first_draws_is_checked():
    TrainConfig(first_draws=2).validate()
    with pytest.raises(ConfigError, match="first_draws must lie in"):
        TrainConfig(first_draws=5, max_draws=4).validate()
    with pytest.raises(ConfigError, match="needs dynamic_sampling"):
        TrainConfig(first_draws=2, dynamic_sampling=False).validate()


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("regime", ["policy", "ce", "detach", "occ", "occ-exact"])
def test_sorted_micro_batches_give_the_same_loss_and_gradients(setup, regime):
    import copy

    from mtprl.model import apply_regime
    from mtprl.train.batch import micro_batches, minibatch_rows, sort_lengths
    from mtprl.train.update import accumulate_gradients

    model, cfg, batch = setup
    cfg = dataclasses.replace(cfg, regime=regime)
    g = torch.Generator().manual_seed(0)  # the random model earns no reward: advantages of our own
    batch = dataclasses.replace(batch, advantages=torch.randn(batch.size, generator=g))
    prepare_log_probs(model, None, batch, cfg, 1, Dist())
    # As after some optimiser steps: the policy has moved from θ_old, so δ ≠ 0 and OCC's λ ≠ 0.
    batch.old_log_probs = torch.where(batch.loss_mask, batch.old_log_probs + 0.1 * torch.randn(
        batch.old_log_probs.shape, generator=g), 0.0)
    sorted_cfg = dataclasses.replace(cfg, sort_micro_batches=True)
    lengths = sort_lengths(batch, sorted_cfg)
    assert sort_lengths(batch, cfg) is None and torch.equal(lengths, batch.attention_mask.sum(1))
    rows = minibatch_rows(batch.size, cfg.mini_batches, cfg.seed, 1, 0)[1]
    plain, ordered = micro_batches(rows, Dist(), 4), micro_batches(rows, Dist(), 4, lengths)
    assert sorted(torch.cat(ordered).tolist()) == sorted(rows.tolist())  # the same mini-batch, cut otherwise
    slots = {name: sum(batch.select(mb).input_ids.numel() for mb in layout)
             for name, layout in (("plain", plain), ("sorted", ordered))}
    assert slots["sorted"] < slots["plain"]  # the option does something: fewer padded slots
    out = {}
    for name, c in (("plain", cfg), ("sorted", sorted_cfg)):
        m = copy.deepcopy(model)
        apply_regime(m, regime)
        metrics = accumulate_gradients(m, batch, rows, c, Dist())
        out[name] = (metrics, _grads(m))
    (m0, g0), (m1, g1) = out["plain"], out["sorted"]
    assert set(m1) == set(m0)
    for key in m0:  # losses, λ, ĉ, clip fractions, entropy: every metric of the unsorted micro-batches
        # ĉ's per-token ratio δμ / (μ² + ε) magnifies the forward's rounding where μ ≈ 0, and OCC's λ
        # (so its MTP loss) is made of it
        loose = "c_hat" in key or "lambda" in key or (regime.startswith("occ") and key.startswith("mtp/"))
        rel = 1e-4 if loose else 1e-5
        assert m1[key] == pytest.approx(m0[key], rel=rel, abs=1e-7), key
    if regime in ("occ", "occ-exact"):
        assert abs(m0["mtp/0/lambda"]) > 1e-4  # a real λ, not the first mini-batch's 0
    assert any(g.abs().sum() > 0 for g in g0)
    for a, b in zip(g0, g1):  # float rounding: within 1e-4 of each tensor's own scale
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()) + 1e-12)


def test_sorted_micro_batches_keep_the_first_ratio_exactly_one(setup):
    import copy

    from mtprl.train.update import build_optimizer, train_on_batch

    model, cfg, batch = setup
    cfg = dataclasses.replace(cfg, regime="occ", sort_micro_batches=True)
    m = copy.deepcopy(model)
    optimizer, scheduler = build_optimizer(m, cfg)
    prepare_log_probs(m, None, batch, cfg, 1, Dist())
    metrics = train_on_batch(m, optimizer, scheduler, batch, cfg, 1, Dist())
    assert metrics["mtp/0/lambda_first"] == 0.0  # old log-probs were computed in the same (sorted) layout


def test_gathered_log_probs_equal_the_micro_batch_forward(setup):
    """The sorted path's forward: rows of other micro-batches' left-aligned forwards, gathered = the plain
    forward of the rows' own micro-batch."""
    from mtprl.train.batch import gather_log_probs, micro_batches, minibatch_rows, sort_lengths
    from mtprl.train.update import microbatch_forward

    model, cfg, batch = setup
    rows = minibatch_rows(batch.size, cfg.mini_batches, cfg.seed, 1, 0)[0]
    ordered = micro_batches(rows, Dist(), 3, sort_lengths(batch, dataclasses.replace(cfg, sort_micro_batches=True)))
    prompt_lengths = batch.attention_mask[:, : batch.prompt_len].sum(1)[rows]
    assert len(set(prompt_lengths.tolist())) > 1  # rows with left padding: the alignment moves something
    parts = [(r, microbatch_forward(model, batch.select(r), cfg, left_align=True)) for r in ordered]
    for mb_rows in micro_batches(rows, Dist(), 4):
        mb = batch.select(mb_rows)
        direct = microbatch_forward(model, mb, cfg)
        gathered = gather_log_probs(parts, mb_rows, mb.response_mask.shape[1])
        for name in ("mask", "mtp_mask", "mtp_top1"):
            assert torch.equal(getattr(gathered, name), getattr(direct, name)), name
        for name in ("log_probs", "mtp_log_probs", "entropy"):
            torch.testing.assert_close(getattr(gathered, name), getattr(direct, name), rtol=1e-5, atol=1e-6)
        assert gathered.log_probs.requires_grad  # with graph, into the sorted forwards
    with pytest.raises(ValueError, match="in none of the parts"):
        gather_log_probs(parts[:1], rows, 4)


def test_left_aligned_forward_equals_the_padded_one():
    """Rows of varied prompt and response lengths: moving each row to column 0 changes nothing but rounding."""
    from mtprl.train.batch import TrainBatch, response_log_probs

    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=3).eval()
    g = torch.Generator().manual_seed(1)
    P, R, N = 10, 12, 6
    prompt_len = torch.tensor([2, 10, 5, 7, 3, 9])
    resp_len = torch.tensor([12, 1, 8, 3, 12, 5])  # long prompts with short responses: the rectangle wastes most
    cols = torch.arange(P + R)
    attn = (cols >= P - prompt_len[:, None]) & (cols < P + resp_len[:, None])
    ids = torch.where(attn, torch.randint(3, len(tok), (N, P + R), generator=g), 0)
    batch = TrainBatch.build(ids, attn, attn[:, P:], torch.randn(N, generator=g), model.num_mtp)
    assert int(attn.sum(1).max()) < P + R  # the aligned forward is narrower (here 15 of 22 columns)
    plain = response_log_probs(model, batch, 1.0, with_entropy=True)
    aligned = response_log_probs(model, batch, 1.0, with_entropy=True, left_align=True)
    for name in ("mask", "mtp_mask", "mtp_top1"):
        assert torch.equal(getattr(aligned, name), getattr(plain, name)), name
    assert plain.mask.sum() == resp_len.sum() and plain.mtp_mask.sum() > 0
    for name in ("log_probs", "mtp_log_probs", "entropy"):
        torch.testing.assert_close(getattr(aligned, name), getattr(plain, name), rtol=1e-5, atol=1e-6)
    # and the gradient through it
    grads = []
    for left in (False, True):
        model.zero_grad(set_to_none=True)
        out = response_log_probs(model, batch, 1.0, left_align=left)
        (out.log_probs.sum() + out.mtp_log_probs.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()) + 1e-12)
