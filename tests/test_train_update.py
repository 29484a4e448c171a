"""The training update (no rollout) on a fixed synthetic batch: regimes, normalisation, OCC λ, exact terms."""

import copy

import pytest
import torch

from mtprl.losses import gradient_alignment, mtp_head_losses, mtp_loss, policy_loss
from mtprl.model import MTPCausalLM, apply_regime, build_tiny_model, build_tokenizer, tiny_config
from mtprl.train.batch import TrainBatch, head_masks, response_log_probs
from mtprl.train.config import TrainConfig
from mtprl.train.distributed import Dist
from mtprl.train.update import (
    Counts, accumulate_gradients, build_optimizer, microbatch_loss, minibatch_update, prepare_log_probs,
    train_on_batch,
)

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


def make_config(regime: str, **over) -> TrainConfig:
    values = dict(regime=regime, prompts_per_step=4, group_size=4, mini_batches=4, micro_batch_size=4,
                  max_new_tokens=10, lr=1e-2, max_grad_norm=0.5, mtp_coef=0.5, eval_suites=["add-easy"])
    values.update(over)
    return TrainConfig(**values)


def make_batch(num_heads: int, n: int = 16, seed: int = 0) -> TrainBatch:
    """n sequences: left-padded prompts of 3..6 tokens, right-padded responses of 2..10 tokens, random advantages."""
    g = torch.Generator().manual_seed(seed)
    P, R = 6, 10
    prompt_len = torch.randint(3, P + 1, (n,), generator=g)
    resp_len = torch.randint(2, R + 1, (n,), generator=g)
    ids = torch.randint(3, 99, (n, P + R), generator=g)
    cols = torch.arange(P + R)
    attn = (cols >= P - prompt_len[:, None]) & (cols < P + resp_len[:, None])
    ids = torch.where(attn, ids, 0)
    resp = attn[:, P:]
    adv = torch.randn(n, generator=g)
    return TrainBatch.build(ids, attn, resp, adv, num_heads)


@pytest.fixture(scope="module")
def base_model():
    return build_tiny_model(build_tokenizer(), num_mtp_layers=1, seed=3, **SMALL).eval()


def fresh(base, regime):
    model = copy.deepcopy(base)
    apply_regime(model, regime)
    return model


def shared_grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.shared_parameters()]


def test_head_masks_follow_the_model(base_model):
    """The batch layout's masks equal the positions token_log_probs scores (depth k: x_t and x_{t-k-2} real)."""
    batch = make_batch(num_heads=2)
    model = build_tiny_model(build_tokenizer(), num_mtp_layers=2, seed=0, **SMALL)
    with torch.no_grad():
        lp = response_log_probs(model, batch, 1.0)
    assert torch.equal(lp.mask, batch.loss_mask) and torch.equal(lp.mtp_mask, batch.head_mask)
    # Hand check on one row: prompt [a b] (2 real tokens), response [c d]: main scores c, d; depth 1
    # scores c (needs x_{t-2} = a) and d; depth 2 scores d only (needs x_{t-3}, which for c is padding).
    attn = torch.tensor([[False, True, True, True, True]])
    main, heads = head_masks(attn, torch.tensor([[True, True]]), 2)
    assert main.tolist() == [[True, True]] and heads[:, 0].tolist() == [[True, True], [False, True]]


@pytest.mark.parametrize("regime", ["frozen", "detach-mtp-only"])
def test_frozen_and_detach_mtp_only_leave_the_shared_gradient_of_the_main_loss(base_model, regime):
    cfg = make_config(regime)
    batch = make_batch(num_heads=1)
    model = fresh(base_model, regime)
    prepare_log_probs(model, None, batch, cfg, step=1, dist=Dist())
    rows = torch.arange(batch.size)
    counts = Counts.of(batch, rows)
    loss, metrics = microbatch_loss(model, batch.select(rows), cfg, counts)
    loss.backward()
    with_mtp = shared_grads(model)

    plain = fresh(base_model, "policy")
    mb = batch.select(rows)
    lp = response_log_probs(plain, mb, 1.0, mtp=False)
    main, _ = policy_loss(lp.log_probs, mb.old_log_probs, mb.advantages, mb.loss_mask, 0.2, 0.28, cfg.dual_clip)
    main.backward()
    for a, b in zip(with_mtp, shared_grads(plain)):
        assert torch.equal(a, b)
    mtp_grads = [p.grad for p in model.mtp_parameters()]
    if regime == "frozen":
        assert all(g is None for g in mtp_grads) and metrics["mtp/0/lambda"] == 0.0
    else:  # detach-mtp-only trains the MTP layer on its own
        assert sum(float(g.abs().sum()) for g in mtp_grads) > 0 and metrics["mtp/0/lambda"] == pytest.approx(0.5)


def untied_model(regime: str) -> MTPCausalLM:
    """A tiny model whose token embedding and output head are separate tensors (as in MiMo-7B)."""
    config = tiny_config(build_tokenizer(), **SMALL)
    config.tie_word_embeddings = False
    torch.manual_seed(5)
    model = MTPCausalLM(config, 1).eval()
    assert model.base.get_input_embeddings().weight is not model.base.get_output_embeddings().weight
    apply_regime(model, regime)
    return model


@pytest.mark.parametrize("regime", ["detach", "detach-mtp-only", "ce"])
def test_what_the_mtp_term_sends_into_the_shared_parameters(regime):
    """detach (the authors'): exactly zero into trunk and embedding, non-zero into the output head;
    detach-mtp-only: zero into every shared parameter; ce: the full gradient (embedding included)."""
    model = untied_model(regime)
    cfg = make_config(regime)
    batch = make_batch(num_heads=1)
    prepare_log_probs(model, None, batch, cfg, step=1, dist=Dist())
    mb = batch.select(torch.arange(batch.size))
    lp = response_log_probs(model, mb, 1.0)
    term, _ = mtp_loss(regime, mtp_log_prob=lp.mtp_log_probs, mtp_mask=mb.head_mask, log_prob=lp.log_probs,
                       old_log_prob=mb.old_log_probs, advantages=mb.advantages, coef=0.5)
    head = model.base.get_output_embeddings().weight
    embedding = model.base.get_input_embeddings().weight
    trunk = [p for p in model.shared_parameters() if p is not head and p is not embedding]
    grads = torch.autograd.grad(term, [head, embedding, *trunk], allow_unused=True)
    size = [0.0 if g is None else float(g.abs().sum()) for g in grads]
    head_size, embedding_size, trunk_size = size[0], size[1], sum(size[2:])
    if regime == "detach":
        assert head_size > 0 and embedding_size == 0.0 and trunk_size == 0.0
    elif regime == "detach-mtp-only":
        assert head_size == embedding_size == trunk_size == 0.0
    else:
        assert head_size > 0 and embedding_size > 0 and trunk_size > 0


def test_detach_mtp_only_takes_the_same_shared_step_as_frozen_even_when_clipping(base_model):
    """Shared and MTP-only gradients are clipped separately, so detach-mtp-only's shared update is frozen's."""
    results = {}
    for regime in ("frozen", "detach-mtp-only"):
        cfg = make_config(regime, max_grad_norm=1e-3)  # clipping certainly active
        model = fresh(base_model, regime)
        optimizer, scheduler = build_optimizer(model, cfg)
        batch = make_batch(num_heads=1)
        prepare_log_probs(model, None, batch, cfg, step=1, dist=Dist())
        metrics = minibatch_update(model, optimizer, scheduler, batch, torch.arange(8), cfg, Dist())
        assert metrics["grad_norm"] > 1e-3
        results[regime] = [p.detach().clone() for p in model.shared_parameters()]
    for a, b in zip(results["frozen"], results["detach-mtp-only"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_add_up_to_the_mini_batch(base_model, agg):
    """Losses divided by whole-mini-batch counts: the gradients of 1-row micro-batches sum to the full one."""
    grads, losses = [], []
    for micro in (8, 1):
        cfg = make_config("policy", micro_batch_size=micro, loss_agg=agg)
        model = fresh(base_model, "policy")
        batch = make_batch(num_heads=1)
        prepare_log_probs(model, None, batch, cfg, step=1, dist=Dist())
        metrics = accumulate_gradients(model, batch, torch.arange(8), cfg, Dist())
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        losses.append((metrics["pg/loss"], metrics["mtp/0/loss"]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-5)
    assert losses[0] == pytest.approx(losses[1], abs=1e-7)  # the shares add up to the mini-batch loss


def test_occ_lambda_is_zero_on_the_first_mini_batch_only(base_model):
    cfg = make_config("occ", mini_batches=4, micro_batch_size=4)
    model = fresh(base_model, "occ")
    optimizer, scheduler = build_optimizer(model, cfg)
    batch = make_batch(num_heads=1)
    prepare_log_probs(model, None, batch, cfg, step=1, dist=Dist())
    metrics = train_on_batch(model, optimizer, scheduler, batch, cfg, step=1, dist=Dist())
    # θ = θ_old on the first mini-batch: old log-probs were computed in the same micro-batches, so
    # δ = ℓ − ℓ° is exactly 0, ĉ = mean δμ/(μ²+ε) = 0 and λ = 0 (and the ratio is exactly 1).
    assert metrics["mtp/0/lambda_first"] == 0.0
    # Mean over the 4 mini-batches: 0 for the first, non-zero afterwards (the policy has moved).
    assert metrics["mtp/0/lambda"] != 0.0 and metrics["pg/approx_kl"] > 0


def test_occ_exact_uses_the_exact_slope(base_model):
    """occ-exact's ĉ is ⟨g_RL, g_MTP⟩ / (‖g_MTP‖² + ε) on the shared parameters, computed independently."""
    cfg = make_config("occ-exact")
    model = fresh(base_model, "occ-exact")
    batch = make_batch(num_heads=1)
    prepare_log_probs(model, None, batch, cfg, step=1, dist=Dist())
    rows = torch.arange(batch.size)
    mb, counts = batch.select(rows), Counts.of(batch, rows)
    _, metrics = microbatch_loss(model, mb, cfg, counts)

    lp = response_log_probs(model, mb, 1.0)
    rl, _ = policy_loss(lp.log_probs, mb.old_log_probs, mb.advantages, mb.loss_mask, 0.2, 0.28)
    (head,) = mtp_head_losses("policy", mtp_log_prob=lp.mtp_log_probs, mtp_mask=mb.head_mask, log_prob=lp.log_probs,
                              old_log_prob=mb.old_log_probs, advantages=mb.advantages)
    slope = gradient_alignment(model.shared_parameters(), rl, head)["slope"]
    assert slope != 0.0
    assert metrics["mtp/0/c_hat"] == pytest.approx(slope, rel=1e-4)
    assert metrics["mtp/0/lambda"] == pytest.approx(0.5 * slope, rel=1e-4)  # (λ₀ / K) · ĉ, K = 1


@pytest.mark.parametrize("regime", ["detach", "occ"])
def test_exact_terms_do_not_change_the_update(base_model, regime):
    params, metrics = [], []
    for exact in (False, True):
        cfg = make_config(regime, mini_batches=2, micro_batch_size=8)
        model = fresh(base_model, regime)
        optimizer, scheduler = build_optimizer(model, cfg)
        batch = make_batch(num_heads=1)
        prepare_log_probs(model, None, batch, cfg, step=1, dist=Dist())
        metrics.append(train_on_batch(model, optimizer, scheduler, batch, cfg, step=1, dist=Dist(), exact=exact))
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(params[0], params[1])
    exact = metrics[1]
    assert {"exact/0/dot", "exact/0/g_rl_sq", "exact/0/g_mtp_sq", "exact/0/cos", "exact/0/slope",
            "exact/0/proxy_c_hat"} <= exact.keys()
    # The probe is the policy-form MTP loss even under detach, so it does reach the shared parameters.
    assert exact["exact/0/g_mtp_sq"] > 0 and -1.0 <= exact["exact/0/cos"] <= 1.0
    assert exact["exact/0/slope"] == pytest.approx(exact["exact/0/dot"] / (exact["exact/0/g_mtp_sq"] + 1e-8), rel=1e-6)


def test_kl_loss_to_the_frozen_reference(base_model):
    cfg = make_config("policy", kl_coef=0.5, mini_batches=2, micro_batch_size=8)
    model, reference = fresh(base_model, "policy"), fresh(base_model, "policy").requires_grad_(False)
    optimizer, scheduler = build_optimizer(model, cfg)
    batch = make_batch(num_heads=1)
    prepare_log_probs(model, reference, batch, cfg, step=1, dist=Dist())
    assert torch.equal(batch.ref_log_probs, batch.old_log_probs)  # the run starts at the reference
    metrics = train_on_batch(model, optimizer, scheduler, batch, cfg, step=1, dist=Dist())
    # k3 = exp(−x) + x − 1 >= 0 with x = ℓ − ℓ_ref: 0 on the first mini-batch, > 0 once the policy moved.
    assert metrics["kl/loss"] > 0 and all(p.grad is None for p in reference.parameters())


@pytest.mark.parametrize("regime", ["occ-exact", "ce"])
def test_two_heads_each_get_their_own_lambda_and_exact_terms(regime):
    model = build_tiny_model(build_tokenizer(), num_mtp_layers=2, seed=4, **SMALL).eval()
    apply_regime(model, regime)
    cfg = make_config(regime, mini_batches=2, micro_batch_size=8)
    optimizer, scheduler = build_optimizer(model, cfg)
    batch = make_batch(num_heads=2)
    prepare_log_probs(model, None, batch, cfg, step=1, dist=Dist())
    metrics = train_on_batch(model, optimizer, scheduler, batch, cfg, step=1, dist=Dist(), exact=True)
    for k in (0, 1):
        keys = {f"mtp/{k}/lambda", f"mtp/{k}/lambda_first", f"mtp/{k}/c_hat", f"mtp/{k}/loss", f"mtp/{k}/top1",
                f"exact/{k}/slope", f"exact/{k}/cos"}
        assert keys <= metrics.keys() and all(torch.isfinite(torch.tensor(metrics[key])) for key in keys)
    if regime == "ce":  # fixed λ_k = λ₀ / K = 0.5 / 2
        assert metrics["mtp/0/lambda"] == metrics["mtp/1/lambda"] == pytest.approx(0.25)
    else:
        assert metrics["mtp/0/lambda"] != metrics["mtp/1/lambda"]
