"""Hand-computed values for occ_coefficient, mtp_loss (every regime), mtp_head_losses, the regime
registry and gradient_alignment, and their bad-input errors."""

import dataclasses
import math

import pytest
import torch

from mtprl.losses import (
    MTP_REGIMES, Detach, HeadInputs, ce_head, fixed_coefficient, get_regime, gradient_alignment, mtp_head_losses,
    mtp_loss, mtp_metric_keys, occ_coefficient, policy_loss, register_regime, surrogate_head,
)

NAN = float("nan")

# One sequence of three valid tokens and one padding token (nan everywhere there).
# old = [-1, -2, -0.5], δ = ℓ - ℓ° = [0.2, -0.1, 0.3], μ = m - ℓ° = [0.1, 0.2, -0.5].
OLD = torch.tensor([[-1.0, -2.0, -0.5, NAN]], dtype=torch.float64)
DELTA = torch.tensor([[0.2, -0.1, 0.3, NAN]], dtype=torch.float64)
MU = torch.tensor([[0.1, 0.2, -0.5, NAN]], dtype=torch.float64)
LOG_PROB = OLD + DELTA
MTP = OLD + MU
MASK = torch.tensor([[1, 1, 1, 0]])
# mean-ratio: δμ/μ² = δ/μ = [2, -0.5, -0.6] -> masked mean 0.9 / 3 = 0.3
#   (the reference code's unmasked mean would give 0.9 / 4 = 0.225)
# ratio-of-sums: Σδμ = 0.02 - 0.02 - 0.15 = -0.15, Σμ² = 0.01 + 0.04 + 0.25 = 0.30 -> -0.5
# (ε = 1e-8 in the denominators moves these by at most 1e-8 / 0.01 = 1e-6 relative, hence rel=1e-5)
C_MEAN_RATIO, C_RATIO_OF_SUMS = 0.3, -0.5


def test_occ_coefficient_mean_ratio_and_ratio_of_sums_by_hand():
    lam, metrics = occ_coefficient(MTP, LOG_PROB, OLD, MASK)  # base 0.1, one head -> λ = 0.1 ĉ
    assert lam.ndim == 0 and not lam.requires_grad
    assert lam.item() == pytest.approx(0.1 * C_MEAN_RATIO, rel=1e-5)
    assert metrics["c_hat"] == pytest.approx(C_MEAN_RATIO, rel=1e-5)
    assert metrics["lambda"] == pytest.approx(0.03, rel=1e-5)
    assert metrics["small_mu_frac"] == 0.0
    lam, metrics = occ_coefficient(MTP, LOG_PROB, OLD, MASK, base=0.1, num_heads=2, estimator="ratio-of-sums")
    assert metrics["c_hat"] == pytest.approx(C_RATIO_OF_SUMS, rel=1e-5)
    assert lam.item() == pytest.approx(0.05 * C_RATIO_OF_SUMS, rel=1e-5)  # (0.1 / 2) · (-0.5) = -0.025


def test_occ_coefficient_clip_and_small_mu():
    # clip (0, 0.01): 0.03 -> 0.01 ; ratio-of-sums -0.05 -> 0.
    assert occ_coefficient(MTP, LOG_PROB, OLD, MASK, clip=(0.0, 0.01))[0].item() == 0.01
    assert occ_coefficient(MTP, LOG_PROB, OLD, MASK, estimator="ratio-of-sums", clip=(0.0, 1.0))[0].item() == 0.0
    # μ = [0, 0.5], δ = [0.3, 0.5]: 0·0.3 / (0 + 1e-8) = 0 and 0.25 / 0.25 = 1 -> ĉ = 0.5; half the μ small.
    mu, delta = torch.tensor([[0.0, 0.5]]), torch.tensor([[0.3, 0.5]])
    _, metrics = occ_coefficient(mu, delta, torch.zeros(1, 2), torch.ones(1, 2), base=1.0)
    assert metrics["c_hat"] == pytest.approx(0.5) and metrics["small_mu_frac"] == 0.5


def test_occ_coefficient_gradient_free_even_with_grad_inputs_and_empty_mask_is_zero():
    lam, _ = occ_coefficient(MTP.clone().requires_grad_(True), LOG_PROB.clone().requires_grad_(True), OLD, MASK)
    assert not lam.requires_grad
    for estimator in ("mean-ratio", "ratio-of-sums"):
        assert occ_coefficient(MTP, LOG_PROB, OLD, torch.zeros_like(MASK), estimator=estimator)[0].item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"estimator": "median"}, "unknown OCC estimator 'median'.*mean-ratio, ratio-of-sums"),
        ({"clip": (1.0, 0.0)}, r"clip must be None or a pair \(lo, hi\) with lo <= hi"),
        ({"num_heads": 0}, "num_heads must be an int >= 1"),
        ({"eps": -1e-8}, "eps must be a number >= 0"),
        ({"mtp_log_prob": MTP[:, :3]}, "shape mismatch: mtp_log_prob"),
        ({"mask": MASK[:, :2]}, "shape mismatch: mask"),
    ],
)
def test_occ_coefficient_bad_input(kwargs, message):
    args = {"mtp_log_prob": MTP, "log_prob": LOG_PROB, "old_log_prob": OLD, "mask": MASK, **kwargs}
    with pytest.raises(ValueError, match=message):
        occ_coefficient(**args)


# The MTP head's clipped surrogate with A = +1 on the same tokens: ratios exp(μ) =
# [1.105171, 1.221403, 0.606531] all unclipped for A > 0 (r < 1.28; r = 0.61 keeps -0.61 > -0.8), so
# L = -(1.105171 + 1.221403 + 0.606531) / 3 = -0.977702.
L_SURROGATE = -(math.exp(0.1) + math.exp(0.2) + math.exp(-0.5)) / 3
SURROGATE_ARGS = {
    "mtp_log_prob": MTP, "mtp_mask": MASK, "log_prob": LOG_PROB, "old_log_prob": OLD, "advantages": torch.tensor([1.0])
}


def slopes_for(regime: str, num_heads: int = 1) -> dict:
    return {"exact_slope": [1.0] * num_heads} if get_regime(regime).needs_exact_slopes else {}


def test_frozen_is_a_zero_without_graph_and_logs_the_proxy():
    loss, metrics = mtp_loss("frozen", **SURROGATE_ARGS)
    assert loss.dtype == torch.float64 and loss.item() == 0.0 and not loss.requires_grad
    assert metrics["mtp/loss"] == metrics["mtp/0/loss"] == metrics["mtp/0/lambda"] == metrics["mtp/0/c_hat"] == 0.0
    assert metrics["mtp/0/proxy_c_hat"] == pytest.approx(C_MEAN_RATIO, rel=1e-5)  # the tokens' proxy, as under occ
    assert metrics["mtp/0/clipfrac_low"] == metrics["mtp/0/clipfrac_high"] == 0.0  # no term, nothing clipped
    assert metrics["mtp/0/ratio_max"] == pytest.approx(math.exp(0.2))  # the MTP ratio's statistics all the same


@pytest.mark.parametrize("regime", list(MTP_REGIMES))
def test_every_regime_emits_the_same_metric_keys(regime):
    mtp = torch.stack([MTP, MTP - 0.1])  # [2, 1, 4]
    mask = torch.stack([MASK, MASK])
    args = {**SURROGATE_ARGS, "mtp_log_prob": mtp, "mtp_mask": mask}
    _, metrics = mtp_loss(regime, **args, **slopes_for(regime, 2))
    assert metrics.keys() == mtp_metric_keys(2)
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("regime", ["ce", "detach", "detach-mtp-only"])
def test_ce_regimes_by_hand_with_two_heads(regime):
    # head 0: m = [-1, -2, -3] all valid -> CE = 2 ; head 1: first position invalid (nan), m = [-0.5, -1.5] -> 1.
    # λ_k = 0.1 / 2 = 0.05 -> terms 0.1 and 0.05, total 0.15.
    mtp = torch.tensor([[[-1.0, -2.0, -3.0]], [[NAN, -0.5, -1.5]]], requires_grad=True)
    mask = torch.tensor([[[1, 1, 1]], [[0, 1, 1]]])
    old = torch.full((1, 3), -1.0)
    loss, metrics = mtp_loss(regime, mtp_log_prob=mtp, mtp_mask=mask, log_prob=old, old_log_prob=old,
                             advantages=torch.ones(1), coef=0.1)
    assert loss.item() == pytest.approx(0.15)
    assert metrics["mtp/0/loss"] == pytest.approx(0.1) and metrics["mtp/1/loss"] == pytest.approx(0.05)
    assert metrics["mtp/0/lambda"] == pytest.approx(0.05) and metrics["mtp/lambda_mean"] == pytest.approx(0.05)
    assert metrics["mtp/0/c_hat"] == 1.0  # fixed λ = (λ₀ / K) · 1
    # d total / d m = -λ_k / n_k: head 0 -0.05/3 per token, head 1 -0.05/2 on its valid tokens, 0 on padding.
    (grad,) = torch.autograd.grad(loss, mtp)
    assert torch.allclose(grad, torch.tensor([[[-0.05 / 3] * 3], [[0.0, -0.025, -0.025]]]))


def test_policy_regime_by_hand():
    loss, metrics = mtp_loss("policy", coef=0.1, **SURROGATE_ARGS)
    assert loss.item() == pytest.approx(0.1 * L_SURROGATE)
    assert metrics["mtp/0/loss"] == pytest.approx(0.1 * L_SURROGATE)
    assert metrics["mtp/0/clipfrac_high"] == 0.0 and metrics["mtp/0/ratio_max"] == pytest.approx(math.exp(0.2))
    assert metrics["mtp/0/proxy_c_hat"] == pytest.approx(C_MEAN_RATIO, rel=1e-5)


# λ·A (the authors' form) against λ·L, worked by hand. Clip band [0.8, 1.28], one sequence, A = +1:
#   token a: r = 0.5 (below the band), token b: r = 1.5 (above it). l = max(-A'r, -A' clip(r)) with A' the
#   advantage used.
#   L(A = 1):  a: max(-0.5, -0.8) = -0.5 (unclipped, dl/dlog r = -0.5);  b: max(-1.5, -1.28) = -1.28 (clipped)
#   λ = +0.5:  λ·L = 0.5 · (-0.5 - 1.28) / 2 = -0.445;  λ·A (A' = 0.5): a: max(-0.25, -0.4) = -0.25,
#              b: max(-0.75, -0.64) = -0.64 -> (-0.25 - 0.64) / 2 = -0.445: the same, gradients too.
#   λ = -0.5:  λ·L = -0.5 · (-1.78) / 2 = 0.445, gradient on a = λ · (-0.5) / 2 = +0.125 (descent lowers r_a
#              further below the band, without bound), 0 on b.
#              λ·A (A' = -0.5): a: max(0.25, 0.4) = 0.4 (clipped: no gradient); b: max(0.75, 0.64) = 0.75
#              (unclipped, gradient -A'·r / 2 = 0.375: descent lowers r_b back toward the band) -> 0.575.
BAND_OLD = torch.zeros(1, 2, dtype=torch.float64)
BAND_LOG_RATIO = torch.tensor([[math.log(0.5), math.log(1.5)]], dtype=torch.float64)


def band_term(lam: float):
    m = BAND_LOG_RATIO.clone().requires_grad_(True)
    regime = "occ-exact"  # λ = (λ₀ / K) · slope = λ exactly with coef 1 and slope λ: any sign, no proxy
    loss, metrics = mtp_loss(regime, mtp_log_prob=m, mtp_mask=torch.ones(1, 2), log_prob=BAND_OLD,
                             old_log_prob=BAND_OLD, advantages=torch.ones(1), coef=1.0, exact_slope=[lam])
    (grad,) = torch.autograd.grad(loss, m)
    return loss.item(), grad[0].tolist(), metrics


def test_lambda_scales_the_advantages_not_the_loss():
    loss, grad, metrics = band_term(0.5)
    assert loss == pytest.approx(-0.445) and grad == pytest.approx([-0.125, 0.0])
    main, _ = policy_loss(BAND_LOG_RATIO.clone().requires_grad_(True), BAND_OLD, torch.ones(1), torch.ones(1, 2))
    assert loss == pytest.approx(0.5 * main.item())  # λ > 0: λ·A and λ·L agree
    loss, grad, metrics = band_term(-0.5)
    assert loss == pytest.approx(0.575) and grad == pytest.approx([0.0, 0.375])
    assert loss != pytest.approx(-0.5 * main.item())  # λ·L would give 0.445 and gradient [+0.125, 0]
    # The clip fractions are those of the advantages used, λ·A < 0: token a is cut by the lower bound.
    assert metrics["mtp/0/clipfrac_low"] == 0.5 and metrics["mtp/0/clipfrac_high"] == 0.0


def test_dual_clip_bounds_the_mtp_term_on_a_huge_ratio():
    # One token, ratio 50, A = -1, λ = 0.1 (policy, K = 1): A' = -0.1, l = max(0.1·50, 0.1·1.28) = 5, and the
    # default dual clip c = 10 bounds it by -A'·c = 1 (constant: no gradient). Without the dual clip: 5, gradient 5.
    m = torch.tensor([[math.log(50.0)]], dtype=torch.float64, requires_grad=True)
    args = dict(mtp_log_prob=m, mtp_mask=torch.ones(1, 1), log_prob=torch.zeros(1, 1, dtype=torch.float64),
                old_log_prob=torch.zeros(1, 1, dtype=torch.float64), coef=0.1)
    loss, metrics = mtp_loss("policy", advantages=torch.tensor([-1.0]), **args)
    assert loss.item() == pytest.approx(1.0) and metrics["mtp/0/dual_clipfrac"] == 1.0
    assert torch.autograd.grad(loss, m)[0].item() == 0.0
    loss, _ = mtp_loss("policy", advantages=torch.tensor([-1.0]), dual_clip=None, **args)
    assert loss.item() == pytest.approx(5.0) and torch.autograd.grad(loss, m)[0].item() == pytest.approx(5.0)
    # λ < 0 with A = +1 gives the same A' = -0.1: the dual clip acts for -A, bounding the reversed step.
    loss, _ = mtp_loss("occ-exact", advantages=torch.tensor([1.0]), exact_slope=[-1.0],
                       **{**args, "mtp_log_prob": m.detach()})
    assert loss.item() == pytest.approx(1.0)


def test_occ_regime_uses_the_proxy_coefficient():
    # λ = 0.1 · 0.3 = 0.03 (mean-ratio) or 0.1 · (-0.5) = -0.05 (ratio-of-sums).
    loss, metrics = mtp_loss("occ", coef=0.1, **SURROGATE_ARGS)
    assert loss.item() == pytest.approx(0.03 * L_SURROGATE, rel=1e-5)
    assert metrics["mtp/0/c_hat"] == metrics["mtp/0/proxy_c_hat"] == pytest.approx(0.3, rel=1e-5)
    assert metrics["mtp/0/lambda"] == pytest.approx(0.03, rel=1e-5)
    assert metrics["mtp/0/small_mu_frac"] == 0.0
    # ratio-of-sums, clamped to -0.01: λ < 0 -> A' = -0.01 on tokens with ratios [1.105, 1.221, 0.607]:
    # l = 0.01 · max(r, clip(r, 0.8, 1.28)) = 0.01 · [1.105171, 1.221403, 0.8] (the last one clipped).
    loss, _ = mtp_loss("occ", coef=0.1, occ_estimator="ratio-of-sums", occ_clip=(-0.01, 1.0), **SURROGATE_ARGS)
    assert loss.item() == pytest.approx(0.01 * (math.exp(0.1) + math.exp(0.2) + 0.8) / 3)


def test_occ_exact_regime_uses_the_given_slopes():
    # λ = (0.1 / 1) · 2.0 = 0.2 ; clipped to (0, 0.1) -> 0.1.
    loss, metrics = mtp_loss("occ-exact", coef=0.1, exact_slope=[2.0], **SURROGATE_ARGS)
    assert loss.item() == pytest.approx(0.2 * L_SURROGATE) and metrics["mtp/0/c_hat"] == 2.0
    assert metrics["mtp/0/proxy_c_hat"] == pytest.approx(C_MEAN_RATIO, rel=1e-5)  # the proxy under its own key
    loss, _ = mtp_loss("occ-exact", coef=0.1, exact_slope=torch.tensor([2.0]), occ_clip=(0.0, 0.1), **SURROGATE_ARGS)
    assert loss.item() == pytest.approx(0.1 * L_SURROGATE)


def test_head_losses_are_the_unit_terms_and_global_counts_per_head():
    mtp = torch.stack([MTP[0:1], MTP[0:1] - 0.1])  # [2, 1, 4]
    mask = torch.stack([MASK, torch.tensor([[0, 1, 1, 0]])])  # head 1 cannot score position 0
    args = {**SURROGATE_ARGS, "mtp_log_prob": mtp, "mtp_mask": mask}
    losses = mtp_head_losses("occ", **args)
    _, metrics = mtp_loss("policy", coef=2.0, **args)  # λ_k = 2 / 2 = 1: the terms are the unit losses
    assert [loss.item() for loss in losses] == pytest.approx([metrics["mtp/0/loss"], metrics["mtp/1/loss"]])
    # per-head global counts: head 0 over 6 tokens, head 1 over 4 -> the token sums divided by those.
    _, halves = mtp_loss("policy", coef=2.0, global_tokens=[6, 4], **args)
    assert halves["mtp/0/loss"] == pytest.approx(metrics["mtp/0/loss"] * 3 / 6)
    assert halves["mtp/1/loss"] == pytest.approx(metrics["mtp/1/loss"] * 2 / 4)
    assert mtp_head_losses("frozen", **args) == []
    # The probe of frozen and of the detach regimes is the surrogate; ce probes its own cross-entropy.
    for regime in ("frozen", "detach", "detach-mtp-only"):
        assert [h.item() for h in mtp_head_losses(regime, probe=True, **args)] == pytest.approx([h.item() for h in losses])
    ce = mtp_head_losses("ce", probe=True, **args)
    assert ce[0].item() == pytest.approx(-float(MTP[0, :3].mean()))


@pytest.mark.parametrize(
    ("regime", "kwargs", "message"),
    [
        ("grpo", {}, "unknown MTP regime 'grpo'; valid MTP regimes: frozen, detach, detach-mtp-only, ce, policy, occ"),
        ("occ", {"log_prob": None}, "MTP regime 'occ' needs log_prob"),
        ("ce", {"advantages": None}, "MTP regime 'ce' needs advantages"),
        ("frozen", {"mtp_log_prob": None}, "MTP regime 'frozen' needs mtp_log_prob"),
        ("occ-exact", {}, "MTP regime 'occ-exact' needs exact_slope"),
        ("policy", {"exact_slope": [1.0]}, "MTP regime 'policy' takes no exact_slope"),
        ("occ-exact", {"exact_slope": [1.0, 2.0]}, "exact_slope has 2 entries but there are 1 MTP heads"),
        ("policy", {"mtp_mask": MASK[:, :3]}, "shape mismatch: mtp_mask"),
        ("policy", {"old_log_prob": OLD[:, :3]}, "shape mismatch: old_log_prob"),
        ("policy", {"clip_low": -0.2}, "clip_low must be >= 0"),
        ("occ", {"occ_estimator": "mean"}, "unknown OCC estimator 'mean'"),
        ("policy", {"global_tokens": [3, 3]}, "global_tokens has 2 entries but there are 1 MTP heads"),
        ("ce", {"agg": "sum"}, "unknown aggregation mode 'sum'"),
    ],
)
def test_mtp_loss_bad_input(regime, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mtp_loss(regime, **{**SURROGATE_ARGS, **kwargs})


def test_regime_table():
    assert list(MTP_REGIMES) == ["frozen", "detach", "detach-mtp-only", "ce", "policy", "occ", "occ-exact"]
    assert MTP_REGIMES["detach"].detach == Detach(hidden=True, embedding=True, head=False)  # the authors' baseline
    assert MTP_REGIMES["detach-mtp-only"].detach == Detach(hidden=True, embedding=True, head=True)
    assert not MTP_REGIMES["frozen"].trains_mtp and not MTP_REGIMES["frozen"].has_term
    assert [r.name for r in MTP_REGIMES.values() if r.needs_exact_slopes] == ["occ-exact"]
    assert [r.name for r in MTP_REGIMES.values() if r.uses_drift] == ["occ"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        MTP_REGIMES["occ"].trains_mtp = False


def sign_proxy(x: HeadInputs, k: int):
    """A toy coefficient rule: λ_k = (λ₀ / K)·sign(ĉ_k)."""
    c_hat = torch.sign(x.proxy[k])
    return x.base * c_hat, c_hat


@pytest.fixture
def toy_regime():
    regime = register_regime("toy-sign", surrogate_head, sign_proxy, uses_drift=True)
    yield regime
    del MTP_REGIMES["toy-sign"]


def test_a_registered_regime_is_looked_up_like_the_built_in_ones(toy_regime):
    assert get_regime("toy-sign") is toy_regime
    loss, metrics = mtp_loss("toy-sign", coef=0.1, **SURROGATE_ARGS)  # ĉ = 0.3 > 0 -> λ = 0.1
    assert loss.item() == pytest.approx(0.1 * L_SURROGATE) and metrics["mtp/0/c_hat"] == 1.0
    assert metrics.keys() == mtp_metric_keys(1)
    with pytest.raises(ValueError, match="'toy-sign' is already registered"):
        register_regime("toy-sign", surrogate_head, sign_proxy)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head_loss": surrogate_head, "coefficient": None}, "give both a head loss and a coefficient rule"),
        ({"head_loss": None, "coefficient": None}, "cannot train: set trains_mtp=False"),
        ({"head_loss": None, "coefficient": None, "trains_mtp": False, "needs_exact_slopes": True}, "no MTP term"),
        ({"name": " x", "head_loss": ce_head, "coefficient": fixed_coefficient}, "without surrounding spaces"),
    ],
)
def test_register_regime_refuses_inconsistent_records(kwargs, message):
    with pytest.raises(ValueError, match=message):
        register_regime(**{"name": "bad", **kwargs})
    assert "bad" not in MTP_REGIMES


def test_gradient_alignment_by_hand_leaves_grad_empty_and_graphs_alive():
    # w = [1, 2] shared, u = 3 reached by the RL loss only, v = 5 frozen (requires_grad False).
    # loss_rl = w0² + w1 + u  -> g_RL  = [2, 1 | 1 | 0]
    # loss_mtp = 3 w0 - w1 + v -> g_MTP = [3, -1 | 0 (unused) | 0]
    # dot = 6 - 1 = 5 ; ‖g_RL‖² = 4 + 1 + 1 = 6 ; ‖g_MTP‖² = 10 ; cosine = 5 / sqrt(60) ; slope = 5 / 10.
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    u = torch.tensor(3.0, requires_grad=True)
    v = torch.tensor(5.0)
    loss_rl = w[0] ** 2 + w[1] + u
    loss_mtp = 3 * w[0] - w[1] + v
    out = gradient_alignment([w, u, v], loss_rl, loss_mtp)
    assert out["dot"] == pytest.approx(5.0) and out["rl_sq_norm"] == pytest.approx(6.0)
    assert out["mtp_sq_norm"] == pytest.approx(10.0) and out["cosine"] == pytest.approx(5 / math.sqrt(60))
    assert out["slope"] == pytest.approx(0.5)
    assert w.grad is None and u.grad is None
    (loss_rl + loss_mtp).backward()  # graphs kept alive: [2 + 3, 1 - 1] and 1
    assert w.grad.tolist() == [5.0, 0.0] and u.grad.item() == 1.0


def test_gradient_alignment_with_a_constant_mtp_loss_is_zero():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    zero, _ = mtp_loss("frozen", **SURROGATE_ARGS)
    out = gradient_alignment([w], (w**2).sum(), zero)
    assert out == {"dot": 0.0, "rl_sq_norm": 20.0, "mtp_sq_norm": 0.0, "cosine": 0.0, "slope": 0.0}
    with pytest.raises(ValueError, match="needs at least one parameter"):
        gradient_alignment([], zero, zero)
    with pytest.raises(ValueError, match="loss_rl must be a 0-dim loss tensor"):
        gradient_alignment([w], w * 2, zero)


def test_occ_exact_slope_from_gradient_alignment_end_to_end():
    # A linear "trunk" parameter θ feeds both heads: ℓ = θ·x, m = θ·z (one sequence, two tokens).
    # The slope ⟨g_RL, g_MTP⟩ / ‖g_MTP‖² from gradient_alignment, passed to mtp_loss, sets λ = coef · slope.
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    x = torch.tensor([[[1.0, 0.5], [0.2, 1.0]]])  # [B=1, T=2, 2]
    z = torch.tensor([[[0.8, 0.1], [0.4, 0.9]]])
    log_prob, mtp = x @ theta, z @ theta  # [1, 2]
    old = log_prob.detach() - 0.05
    mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    loss_rl, _ = policy_loss(log_prob, old, adv, mask)
    (head,) = mtp_head_losses("occ-exact", mtp_log_prob=mtp, mtp_mask=mask, log_prob=log_prob, old_log_prob=old,
                              advantages=adv)
    slope = gradient_alignment([theta], loss_rl, head)["slope"]
    (g_rl,) = torch.autograd.grad(loss_rl, theta, retain_graph=True)
    (g_mtp,) = torch.autograd.grad(head, theta, retain_graph=True)
    assert slope == pytest.approx((g_rl @ g_mtp / (g_mtp @ g_mtp)).item(), rel=1e-5)
    loss, metrics = mtp_loss("occ-exact", mtp_log_prob=mtp, mtp_mask=mask, log_prob=log_prob, old_log_prob=old,
                             advantages=adv, coef=0.1, exact_slope=[slope])
    assert loss.item() == pytest.approx(0.1 * slope * head.item(), rel=1e-5)
    assert metrics["mtp/0/lambda"] == pytest.approx(0.1 * slope, rel=1e-6)
