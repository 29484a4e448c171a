"""Hand-computed values for occ_coefficient, mtp_loss (every regime), mtp_head_losses and
gradient_alignment, and their bad-input errors."""

import math

import pytest
import torch

from mtprl.losses import MTP_REGIMES, gradient_alignment, mtp_head_losses, mtp_loss, occ_coefficient, policy_loss

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


def test_frozen_is_a_zero_without_graph():
    loss, metrics = mtp_loss("frozen")
    assert loss.item() == 0.0 and not loss.requires_grad and metrics["mtp/loss"] == 0.0
    loss, _ = mtp_loss("frozen", **SURROGATE_ARGS)
    assert loss.dtype == torch.float64 and loss.item() == 0.0


@pytest.mark.parametrize("regime", ["ce", "detach"])
def test_ce_regimes_by_hand_with_two_heads(regime):
    # head 0: m = [-1, -2, -3] all valid -> CE = 2 ; head 1: first position invalid (nan), m = [-0.5, -1.5] -> 1.
    # λ_k = 0.1 / 2 = 0.05 -> total 0.05 · (2 + 1) = 0.15.
    mtp = torch.tensor([[[-1.0, -2.0, -3.0]], [[NAN, -0.5, -1.5]]], requires_grad=True)
    mask = torch.tensor([[[1, 1, 1]], [[0, 1, 1]]])
    loss, metrics = mtp_loss(regime, mtp_log_prob=mtp, mtp_mask=mask, coef=0.1)
    assert loss.item() == pytest.approx(0.15)
    assert metrics["mtp/0/loss"] == pytest.approx(2.0) and metrics["mtp/1/loss"] == pytest.approx(1.0)
    assert metrics["mtp/0/lambda"] == pytest.approx(0.05) and metrics["mtp/lambda_mean"] == pytest.approx(0.05)
    # d total / d m = -λ_k / n_k: head 0 -0.05/3 per token, head 1 -0.05/2 on its valid tokens, 0 on padding.
    (grad,) = torch.autograd.grad(loss, mtp)
    assert torch.allclose(grad, torch.tensor([[[-0.05 / 3] * 3], [[0.0, -0.025, -0.025]]]))


def test_policy_regime_by_hand():
    loss, metrics = mtp_loss("policy", coef=0.1, **SURROGATE_ARGS)
    assert loss.item() == pytest.approx(0.1 * L_SURROGATE)
    assert metrics["mtp/0/loss"] == pytest.approx(L_SURROGATE)
    assert metrics["mtp/0/clip_frac_high"] == 0.0 and metrics["mtp/0/ratio_max"] == pytest.approx(math.exp(0.2))


def test_occ_regime_uses_the_proxy_coefficient():
    # λ = 0.1 · 0.3 = 0.03 (mean-ratio) or 0.1 · (-0.5) = -0.05 (ratio-of-sums).
    loss, metrics = mtp_loss("occ", coef=0.1, **SURROGATE_ARGS)
    assert loss.item() == pytest.approx(0.03 * L_SURROGATE, rel=1e-5)
    assert metrics["mtp/0/c_hat"] == pytest.approx(0.3, rel=1e-5)
    assert metrics["mtp/0/lambda"] == pytest.approx(0.03, rel=1e-5)
    assert metrics["mtp/0/small_mu_frac"] == 0.0
    loss, _ = mtp_loss("occ", coef=0.1, occ_estimator="ratio-of-sums", occ_clip=(-0.01, 1.0), **SURROGATE_ARGS)
    assert loss.item() == pytest.approx(-0.01 * L_SURROGATE)  # -0.05 clamped to -0.01


def test_occ_exact_regime_uses_the_given_slopes():
    # λ = (0.1 / 1) · 2.0 = 0.2 ; clipped to (0, 0.1) -> 0.1.
    loss, metrics = mtp_loss("occ-exact", coef=0.1, exact_slope=[2.0], **SURROGATE_ARGS)
    assert loss.item() == pytest.approx(0.2 * L_SURROGATE) and metrics["mtp/0/c_hat"] == 2.0
    loss, _ = mtp_loss("occ-exact", coef=0.1, exact_slope=torch.tensor([2.0]), occ_clip=(0.0, 0.1), **SURROGATE_ARGS)
    assert loss.item() == pytest.approx(0.1 * L_SURROGATE)


def test_head_losses_match_the_metrics_and_global_counts_per_head():
    mtp = torch.stack([MTP[0:1], MTP[0:1] - 0.1])  # [2, 1, 4]
    mask = torch.stack([MASK, torch.tensor([[0, 1, 1, 0]])])  # head 1 cannot score position 0
    args = {**SURROGATE_ARGS, "mtp_log_prob": mtp, "mtp_mask": mask}
    losses = mtp_head_losses("occ", **{k: v for k, v in args.items() if k != "log_prob"})
    _, metrics = mtp_loss("policy", **args)
    assert [loss.item() for loss in losses] == pytest.approx([metrics["mtp/0/loss"], metrics["mtp/1/loss"]])
    # per-head global counts: head 0 over 6 tokens, head 1 over 4 -> the token sums divided by those.
    _, halves = mtp_loss("policy", global_tokens=[6, 4], **args)
    assert halves["mtp/0/loss"] == pytest.approx(metrics["mtp/0/loss"] * 3 / 6)
    assert halves["mtp/1/loss"] == pytest.approx(metrics["mtp/1/loss"] * 2 / 4)
    assert mtp_head_losses("frozen", mtp_log_prob=mtp, mtp_mask=mask) == []


@pytest.mark.parametrize(
    ("regime", "kwargs", "message"),
    [
        ("grpo", {}, "unknown MTP regime 'grpo'; valid MTP regimes: frozen, detach, ce, policy, occ, occ-exact"),
        ("occ", {"log_prob": None}, "MTP regime 'occ' needs log_prob"),
        ("policy", {"advantages": None}, "MTP regime 'policy' needs advantages"),
        ("occ-exact", {}, "MTP regime 'occ-exact' needs exact_slope"),
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


def test_regime_table_names():
    assert list(MTP_REGIMES) == ["frozen", "detach", "ce", "policy", "occ", "occ-exact"]


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
    zero, _ = mtp_loss("frozen")
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
    (head,) = mtp_head_losses("occ-exact", mtp_log_prob=mtp, mtp_mask=mask, old_log_prob=old, advantages=adv)
    slope = gradient_alignment([theta], loss_rl, head)["slope"]
    (g_rl,) = torch.autograd.grad(loss_rl, theta, retain_graph=True)
    (g_mtp,) = torch.autograd.grad(head, theta, retain_graph=True)
    assert slope == pytest.approx((g_rl @ g_mtp / (g_mtp @ g_mtp)).item(), rel=1e-5)
    loss, metrics = mtp_loss(
        "occ-exact", mtp_log_prob=mtp, mtp_mask=mask, old_log_prob=old, advantages=adv, coef=0.1, exact_slope=[slope]
    )
    assert loss.item() == pytest.approx(0.1 * slope * head.item(), rel=1e-5)
    assert metrics["mtp/0/lambda"] == pytest.approx(0.1 * slope, rel=1e-6)
