"""Property tests (hypothesis) of the loss maths: OCC invariants, the policy-loss gradient, the
policy regime against the main loss, and padding that changes nothing whatever it holds."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mtprl.losses import AGG_MODES, aggregate, kl_loss, mtp_loss, occ_coefficient, policy_loss

FAST = settings(max_examples=150, deadline=None)
ESTIMATORS = st.sampled_from(["mean-ratio", "ratio-of-sums"])
shapes = st.tuples(st.integers(1, 4), st.integers(1, 6))


def _tensors(seed: int, shape, scale: float = 1.0):
    """(old, δ, μ, mask) in float64, with at least one valid token per batch."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    delta = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    mu = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    mask = torch.rand(shape, generator=gen) < 0.7
    mask[0, 0] = True
    return old, delta, mu, mask


@FAST
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, estimator=ESTIMATORS)
def test_occ_is_exactly_zero_when_the_main_head_has_not_moved(seed, shape, estimator):
    old, _, mu, mask = _tensors(seed, shape)
    lam, metrics = occ_coefficient(old + mu, old.clone(), old, mask, estimator=estimator)
    assert lam.item() == 0.0 and metrics["c_hat"] == 0.0


@FAST
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, estimator=ESTIMATORS)
def test_occ_flips_sign_with_delta(seed, shape, estimator):
    # old = 0 makes δ = log_prob exactly, so negating log_prob negates every term exactly.
    _, delta, mu, mask = _tensors(seed, shape)
    zero = torch.zeros(shape, dtype=torch.float64)
    c_plus = occ_coefficient(mu, delta, zero, mask, estimator=estimator)[1]["c_hat"]
    c_minus = occ_coefficient(mu, -delta, zero, mask, estimator=estimator)[1]["c_hat"]
    assert c_minus == -c_plus


@FAST
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, estimator=ESTIMATORS, perm_seed=st.integers(0, 1000))
def test_occ_is_invariant_to_permuting_tokens(seed, shape, estimator, perm_seed):
    old, delta, mu, mask = _tensors(seed, shape)
    perm = torch.randperm(old.numel(), generator=torch.Generator().manual_seed(perm_seed))
    def flat(t):
        return t.reshape(1, -1)[:, perm].reshape(shape)
    lam = occ_coefficient(old + mu, old + delta, old, mask, estimator=estimator)[0]
    lam_perm = occ_coefficient(flat(old + mu), flat(old + delta), flat(old), flat(mask), estimator=estimator)[0]
    assert lam_perm.item() == pytest.approx(lam.item(), rel=1e-9, abs=1e-12)


@FAST
@given(seed=st.integers(0, 2**31 - 1), shape=shapes)
def test_ratio_of_sums_is_the_least_squares_slope_of_delta_on_mu(seed, shape):
    old, delta, mu, mask = _tensors(seed, shape)
    assume(mu[mask].square().sum() > 1e-3)
    _, metrics = occ_coefficient(old + mu, old + delta, old, mask, base=1.0, eps=0.0, estimator="ratio-of-sums")
    # regression through the origin on the valid tokens: argmin_c Σ (δ - c μ)²
    slope = torch.linalg.lstsq(mu[mask][:, None], delta[mask][:, None]).solution.item()
    assert metrics["c_hat"] == pytest.approx(slope, rel=1e-6, abs=1e-9)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=shapes,
    clip_low=st.floats(0.05, 0.5),
    clip_high=st.floats(0.05, 0.5),
    dual_clip=st.one_of(st.none(), st.floats(1.5, 4.0)),
)
def test_policy_loss_gradient_matches_the_analytic_form(seed, shape, clip_low, clip_high, dual_clip):
    # token-mean: d L / d ℓ_t = -A r_t / N where the unclipped term is active, 0 where the ratio is
    # clipped (A>0, r>1+ε_high or A<0, r<1-ε_low) or dual-clipped (A<0, r>c), 0 on padding.
    old, log_ratio, _, mask = _tensors(seed, shape, scale=0.6)
    adv = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ratio = log_ratio.exp()
    bounds = [1 - clip_low, 1 + clip_high] + ([dual_clip] if dual_clip else [])
    assume(all((ratio - b).abs().min() > 1e-6 for b in bounds))  # no token exactly on a boundary
    log_prob = (old + log_ratio).requires_grad_(True)
    loss, _ = policy_loss(log_prob, old, adv, mask, clip_low, clip_high, dual_clip)
    (grad,) = torch.autograd.grad(loss, log_prob)
    a = adv[:, None].expand(shape)
    cut = ((a > 0) & (ratio > 1 + clip_high)) | ((a < 0) & (ratio < 1 - clip_low))
    if dual_clip:
        cut |= (a < 0) & (ratio > dual_clip)
    expected = torch.where(mask & ~cut, -a * ratio, 0.0) / mask.sum()
    assert torch.allclose(grad, expected, rtol=1e-9, atol=1e-12)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=shapes,
    num_heads=st.integers(1, 3),
    agg=st.sampled_from(AGG_MODES),
    coef=st.floats(-1.0, 1.0),
    dual_clip=st.one_of(st.none(), st.just(3.0)),
)
def test_policy_regime_on_main_log_probs_is_the_surrogate_with_scaled_advantages(
    seed, shape, num_heads, agg, coef, dual_clip
):
    # Each of the K heads with m = ℓ is L_PG(ℓ; (coef / K)·A), so the K terms add up to K · L_PG(ℓ; (coef/K)·A);
    # the surrogate is positively homogeneous in A, so for coef >= 0 that is coef · L_RL.
    old, delta, _, mask = _tensors(seed, shape, scale=0.5)
    adv = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    log_prob = old + delta
    options = dict(dual_clip=dual_clip, agg=agg, norm_length=7)
    scaled, _ = policy_loss(log_prob, old, adv * (coef / num_heads), mask, **options)
    term, _ = mtp_loss(
        "policy", mtp_log_prob=log_prob.expand(num_heads, *shape), mtp_mask=mask.expand(num_heads, *shape),
        log_prob=log_prob, old_log_prob=old, advantages=adv, coef=coef, **options,
    )
    assert term.item() == pytest.approx(num_heads * scaled.item(), rel=1e-9, abs=1e-12)
    if coef >= 0:
        main, _ = policy_loss(log_prob, old, adv, mask, **options)
        assert term.item() == pytest.approx(coef * main.item(), rel=1e-9, abs=1e-12)


GARBAGE = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0])


@FAST
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, fill=GARBAGE, agg=st.sampled_from(AGG_MODES))
def test_masked_positions_change_nothing_whatever_they_hold(seed, shape, fill, agg):
    old, delta, mu, mask = _tensors(seed, shape, scale=0.5)
    adv = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)  # [B, T]
    def dirty(t):
        return torch.where(mask, t, fill)
    def run(o, lp, m, a):
        lp = lp.clone().requires_grad_(True)
        m = m.clone().requires_grad_(True)
        values = [
            aggregate(lp, mask, agg, norm_length=5),
            policy_loss(lp, o, a, mask, dual_clip=3.0, agg=agg, norm_length=5)[0],
            kl_loss(lp, o, mask, agg=agg, norm_length=5)[0],
            mtp_loss(
                "occ", mtp_log_prob=m, mtp_mask=mask, log_prob=lp, old_log_prob=o, advantages=a, agg=agg, norm_length=5
            )[0],
            mtp_loss("ce", mtp_log_prob=m, mtp_mask=mask, log_prob=lp, old_log_prob=o, advantages=a, agg=agg,
                     norm_length=5)[0],
            occ_coefficient(m, lp, o, mask)[0],
        ]
        grads = torch.autograd.grad(sum(v for v in values[:5]), (lp, m))
        return torch.stack([v.detach() for v in values]), grads
    clean_values, clean_grads = run(old, old + delta, old + mu, adv)
    dirty_values, dirty_grads = run(dirty(old), dirty(old + delta), dirty(old + mu), dirty(adv))
    assert torch.equal(clean_values, dirty_values)
    for clean, dirty_grad in zip(clean_grads, dirty_grads):
        assert torch.equal(clean, dirty_grad)
        assert torch.all(dirty_grad[~mask] == 0)
