"""Held-out decomposition terms: split-half unbiasedness, the AdamW preconditioner, the trainer's measurement."""

import copy

import pytest
import torch

from mtprl.losses import gradient_alignment, mtp_head_losses, policy_loss
from mtprl.losses.heldout import adam_preconditioner, grad_dot, split_half_terms
from mtprl.train.batch import Counts, response_log_probs
from mtprl.train.distributed import Dist
from mtprl.train.exact import adam_preconditioners, detach_off, heldout_terms, split_groups
from mtprl.train.update import build_optimizer, minibatch_update, prepare_log_probs, train_on_batch

from test_train_update import base_model, fresh, make_batch, make_config  # noqa: F401  (fixture)


def quadratic_gradients(theta, centres):
    """∇ of the per-sample quadratic losses ½‖θ − c_i‖², averaged over the samples: θ − mean_i c_i."""
    return theta - centres.mean(0)


def test_split_half_dot_is_unbiased_where_the_same_batch_one_is_biased_by_tr_cov_over_n():
    """Per-sample losses ℓ_RL,i = ½‖θ − a − e_i‖², ℓ_MTP,i = ½‖θ − b − f_i‖² with f_i = ρ·e_i + noise:
    E ĝ_RL = θ − a, E ĝ_MTP = θ − b, and on one batch of n samples Cov(ĝ_RL, ĝ_MTP) has trace ρ·σ²·d / n.
    The split-half estimate has mean ⟨θ − a, θ − b⟩; the same-batch one that plus ρσ²d/n."""
    g = torch.Generator().manual_seed(0)
    d, n, trials, rho, sigma = 8, 16, 4000, 0.8, 1.0
    theta = torch.zeros(d, dtype=torch.float64)
    a = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    b = a + torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    truth = float((theta - a) @ (theta - b))
    # autograd agrees with the closed-form gradient of the quadratic
    th = theta.clone().requires_grad_(True)
    centres = a + torch.randn(n, d, generator=g, dtype=torch.float64)
    (0.5 * (th - centres).square().sum(1).mean()).backward()
    assert torch.allclose(th.grad, quadratic_gradients(theta, centres))
    held, same = [], []
    for _ in range(trials):
        e = torch.randn(n, d, generator=g, dtype=torch.float64) * sigma
        f = rho * e + torch.randn(n, d, generator=g, dtype=torch.float64) * sigma * (1 - rho ** 2) ** 0.5
        rl_a, rl_b = (quadratic_gradients(theta, a + e[s]) for s in (slice(0, n // 2), slice(n // 2, n)))
        m_a, m_b = (quadratic_gradients(theta, b + f[s]) for s in (slice(0, n // 2), slice(n // 2, n)))
        terms = split_half_terms([rl_a], [rl_b], [m_a], [m_b], 0.5)
        held.append(terms["dot"])
        same.append(terms["same_dot"])
    held, same = torch.tensor(held), torch.tensor(same)
    se_held, se_same = float(held.std() / trials ** 0.5), float(same.std() / trials ** 0.5)
    bias = rho * sigma ** 2 * d / n  # tr Cov(ĝ_RL, ĝ_MTP) = 0.4
    assert abs(float(held.mean()) - truth) < 4 * se_held
    assert abs(float(same.mean()) - (truth + bias)) < 4 * se_same
    assert float(same.mean()) - truth > 10 * se_same  # the same-batch bias is far outside its noise
    # the same-batch estimate of the whole batch is exactly the inner product of the whole-batch means
    assert terms["same_dot"] == pytest.approx(float(quadratic_gradients(theta, a + e) @ quadratic_gradients(theta, b + f)))


def test_adam_preconditioned_terms_equal_a_hand_computation():
    """v = [4, 1], t = 2, β₂ = 0.5, ε = 0.1: v̂ = v / (1 − 0.25) = [16/3, 4/3], P = 1 / (√v̂ + ε)."""
    p = adam_preconditioner(torch.tensor([4.0, 1.0]), 2, 0.5, 0.1)
    hand = [1 / ((16 / 3) ** 0.5 + 0.1), 1 / ((4 / 3) ** 0.5 + 0.1)]
    assert p.tolist() == pytest.approx(hand, rel=1e-12)
    rl_a, rl_b = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -1.0])]
    m_a, m_b = [torch.tensor([0.5, 1.0])], [torch.tensor([-1.0, 2.0])]
    terms = split_half_terms(rl_a, rl_b, m_a, m_b, 0.25, precond=[p], lr=0.01, eps=0.0)
    p0, p1 = hand
    pdot = 0.5 * ((1 * -1 * p0 + 2 * 2 * p1) + (3 * 0.5 * p0 + -1 * 1 * p1))
    assert terms["pdot"] == pytest.approx(pdot, rel=1e-12)
    assert terms["pg_mtp_sq"] == pytest.approx(0.5 * -1 * p0 ** 2 + 1 * 2 * p1 ** 2, rel=1e-12)
    r = [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * -1]  # whole-batch gradients
    m = [0.25 * 0.5 + 0.75 * -1, 0.25 * 1 + 0.75 * 2]
    pm_sq = (p0 * m[0]) ** 2 + (p1 * m[1]) ** 2
    assert terms["same_pdot"] == pytest.approx(r[0] * p0 * m[0] + r[1] * p1 * m[1], rel=1e-12)
    assert terms["same_pg_mtp_sq"] == pytest.approx(pm_sq, rel=1e-12)
    assert terms["lambda_star"] == pytest.approx(pdot / (0.01 * pm_sq), rel=1e-12)
    assert terms["dot"] == pytest.approx(0.5 * ((1 * -1 + 2 * 2) + (3 * 0.5 + -1 * 1)))
    assert grad_dot([torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 4.0])], [torch.tensor([0.5, 2.0])]) == 17.5


def test_the_preconditioner_is_read_from_the_optimiser_state(base_model):
    """After real AdamW steps, P of every shared parameter is 1 / (√(v / (1 − β₂^t)) + ε) of its state."""
    cfg = make_config("policy", mini_batches=2, micro_batch_size=8)
    model = fresh(base_model, "policy")
    optimizer, scheduler = build_optimizer(model, cfg)
    shared = list(model.shared_parameters())
    assert adam_preconditioners(optimizer, shared) is None  # no second moment before the first step
    batch = make_batch(num_heads=1)
    prepare_log_probs(model, None, batch, cfg, step=1, dist=Dist())
    train_on_batch(model, optimizer, scheduler, batch, cfg, step=1, dist=Dist())
    precond = adam_preconditioners(optimizer, shared)
    p, state = shared[0], optimizer.state[shared[0]]
    beta2, eps = optimizer.param_groups[0]["betas"][1], optimizer.param_groups[0]["eps"]
    hand = 1.0 / ((state["exp_avg_sq"].double() / (1 - beta2 ** 2)).sqrt() + eps)  # two steps taken
    assert float(state["step"]) == 2 and torch.allclose(precond[0], hand, rtol=1e-12)


def test_groups_split_into_two_disjoint_halves_of_whole_groups():
    a, b = split_groups(24, 4, seed=0, step=3)
    assert sorted(torch.cat([a, b]).tolist()) == list(range(24)) and len(a) == len(b) == 12
    assert {int(r) // 4 for r in a}.isdisjoint({int(r) // 4 for r in b})
    assert torch.equal(a, split_groups(24, 4, seed=0, step=3)[0])  # seeded by (seed, step) only
    assert split_groups(4, 4, 0, 1) is None


def test_heldout_terms_match_independent_gradients_and_leave_training_untouched(base_model):
    cfg = make_config("occ", mini_batches=2, micro_batch_size=8)
    model = fresh(base_model, "occ")
    optimizer, scheduler = build_optimizer(model, cfg)
    batch = make_batch(num_heads=1)
    prepare_log_probs(model, None, batch, cfg, step=1, dist=Dist())
    minibatch_update(model, optimizer, scheduler, batch, torch.arange(8), cfg, Dist())  # δ ≠ 0, Adam state set
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), torch.get_rng_state()
    out = heldout_terms(model, optimizer, batch, cfg, step=1, dist=Dist())
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), before[2]) and all(p.grad is None for p in model.parameters())
    assert str(optimizer.state_dict()) == str(before[1])
    # the whole-batch (same-batch) dot equals gradient_alignment on the whole batch in one forward pass
    rows = torch.arange(batch.size)
    counts = Counts.of(batch, rows)
    options = dict(agg=cfg.loss_agg, norm_length=float(cfg.max_new_tokens), clip_low=cfg.clip_low,
                   clip_high=cfg.clip_high, dual_clip=cfg.dual_clip)
    with detach_off(model):
        mb = batch.select(rows)
        lp = response_log_probs(model, mb, cfg.temperature, mtp=True)
        rl, _ = policy_loss(lp.log_probs, mb.old_log_probs, mb.advantages, mb.loss_mask, global_tokens=counts.tokens,
                            **options)
        head, = mtp_head_losses("occ", mtp_log_prob=lp.mtp_log_probs, mtp_mask=mb.head_mask, log_prob=lp.log_probs,
                                old_log_prob=mb.old_log_probs, advantages=mb.advantages, probe=True,
                                global_tokens=counts.head_tokens, **options)
        whole = gradient_alignment(model.shared_parameters(), rl, head)
    assert out["heldout/0/same_dot"] == pytest.approx(whole["dot"], rel=1e-4)
    assert out["heldout/0/same_g_mtp_sq"] == pytest.approx(whole["mtp_sq_norm"], rel=1e-4)
    assert out["heldout/0/dot"] != out["heldout/0/same_dot"]
    assert out["heldout/0/lambda_star"] == pytest.approx(
        out["heldout/0/pdot"] / (out["heldout/lr"] * out["heldout/0/same_pg_mtp_sq"] + cfg.occ_eps), rel=1e-9)
    assert out["heldout/0/proxy_mean_ratio"] != 0.0  # after one update the main head has moved


@pytest.mark.parametrize("regime", ["detach", "policy"])
def test_train_on_batch_logs_heldout_terms_without_changing_the_update(base_model, regime):
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
    assert {k: v for k, v in metrics[1].items() if not k.startswith(("exact/", "heldout/"))} == metrics[0]
    assert {"heldout/0/dot", "heldout/0/pdot", "heldout/0/lambda_star", "heldout/0/same_dot",
            "heldout/0/proxy_mean_ratio", "heldout/0/proxy_ratio_of_sums"} <= metrics[1].keys()
