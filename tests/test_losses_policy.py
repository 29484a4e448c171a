"""Hand-computed values for aggregate, clipped_surrogate / policy_loss and the KL estimators."""

import math

import pytest
import torch

from mtprl.losses import aggregate, clipped_surrogate, kl_estimate, kl_loss, policy_loss, valid_counts

NAN, INF = float("nan"), float("inf")

# Padding holds garbage (100, nan, inf) that must change nothing; the third row has no valid token.
LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, NAN, INF], [7.0, 7.0, 7.0, 7.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [
        # valid tokens 1 2 3 | 4 5 ; 5 tokens, 2 sequences with a valid token
        ("token-mean", {}, 15 / 5),  # (1+2+3+4+5) / 5 = 3
        ("seq-mean-token-mean", {}, (2.0 + 4.5) / 2),  # seq means 6/3 = 2 and 9/2 = 4.5
        ("seq-mean-token-sum", {}, (6.0 + 9.0) / 2),  # seq sums 6 and 9
        ("seq-mean-token-sum-norm", {"norm_length": 4}, (6 / 4 + 9 / 4) / 2),  # = 1.875
        ("token-mean", {"global_tokens": 10}, 15 / 10),  # this piece's share of a 10-token batch
        ("seq-mean-token-mean", {"global_seqs": 4}, 6.5 / 4),
        ("seq-mean-token-sum", {"global_seqs": 5}, 15 / 5),
        ("seq-mean-token-sum-norm", {"norm_length": 2, "global_seqs": 3}, (3.0 + 4.5) / 3),
        ("token-mean", {"global_seqs": 99, "norm_length": 7}, 3.0),  # counts of other modes ignored
    ],
)
def test_aggregate_modes_by_hand(mode, kwargs, expected):
    assert aggregate(LOSS_MAT, MASK, mode, **kwargs).item() == pytest.approx(expected)


def test_aggregate_empty_mask_is_zero_and_bool_or_float_masks_agree():
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert aggregate(LOSS_MAT, torch.zeros(3, 4), mode).item() == 0.0
    assert aggregate(LOSS_MAT, MASK.bool()).item() == aggregate(LOSS_MAT, MASK.float()).item() == 3.0


def test_shares_with_global_counts_add_up_to_the_full_batch():
    # Split rows {0} and {1, 2} into two "micro-batches"; with the whole batch's counts the shares
    # add up to the one-call loss, and so do the gradients.
    tokens, seqs = valid_counts(MASK)
    assert (tokens.item(), seqs.item()) == (5, 2)
    values = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]], requires_grad=True)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        full = aggregate(values, MASK, mode, norm_length=4)
        (full_grad,) = torch.autograd.grad(full, values)
        parts = [
            aggregate(values[rows], MASK[rows], mode, global_tokens=tokens, global_seqs=seqs, norm_length=4)
            for rows in (slice(0, 1), slice(1, 3))
        ]
        (parts_grad,) = torch.autograd.grad(sum(parts), values)
        assert sum(parts).item() == pytest.approx(full.item())
        assert torch.allclose(parts_grad, full_grad)


def test_valid_counts_per_head():
    # head 0: tokens 3+2, sequences 2 ; head 1: tokens 1+0, sequences 1
    mask = torch.tensor([[[1, 1, 1, 0], [1, 1, 0, 0]], [[0, 0, 1, 0], [0, 0, 0, 0]]])
    tokens, seqs = valid_counts(mask)
    assert tokens.tolist() == [5, 1] and seqs.tolist() == [2, 1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: aggregate(LOSS_MAT, MASK, "sum"), "unknown aggregation mode 'sum'.*token-mean, seq-mean-token-mean"),
        (lambda: aggregate(LOSS_MAT, MASK, "seq-mean-token-sum-norm"), "needs norm_length"),
        (lambda: aggregate(LOSS_MAT, MASK[:2]), "shape mismatch: mask"),
        (lambda: aggregate(LOSS_MAT, MASK, global_tokens=0), "global_tokens must be > 0"),
        (lambda: aggregate(LOSS_MAT[0], MASK[0]), r"loss_mat must be \[B, T\]"),
    ],
)
def test_aggregate_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# Policy loss. Row 0 has A = +1 and ratios [1.5, 0.5, 1.1]; row 1 has A = -1 and ratios [0.5, 1.5, 4.0];
# the last column is padding holding nan / inf. clip range [0.8, 1.28].
RATIOS = torch.tensor([[1.5, 0.5, 1.1], [0.5, 1.5, 4.0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5, INF], [-0.3, -1.2, -2.5, 0.0]], dtype=torch.float64)
LOG_PROB = OLD.clone()
LOG_PROB[:, :3] += RATIOS.log().double()
LOG_PROB[0, 3], LOG_PROB[1, 3] = NAN, -INF
PG_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)
# Per token, l = max(-A r, -A clip(r, 0.8, 1.28)):
#   A=+1: r=1.5 -> max(-1.5, -1.28) = -1.28 (clipped high) ; r=0.5 -> max(-0.5, -0.8) = -0.5 ; r=1.1 -> -1.1
#   A=-1: r=0.5 -> max(0.5, 0.8) = 0.8 (clipped low) ; r=1.5 -> max(1.5, 1.28) = 1.5 ; r=4 -> 4.0
#         with dual_clip = 3 the last one becomes min(4, 3) = 3.
TOKEN_LOSS = [-1.28, -0.5, -1.1, 0.8, 1.5, 4.0]


def test_policy_loss_token_mean_and_metrics_by_hand():
    log_prob = LOG_PROB.clone().requires_grad_(True)
    loss, metrics = policy_loss(log_prob, OLD, ADV, PG_MASK)
    assert loss.item() == pytest.approx(sum(TOKEN_LOSS) / 6)  # 3.42 / 6 = 0.57
    assert metrics["pg/loss"] == pytest.approx(0.57)
    assert metrics["pg/clipfrac_high"] == pytest.approx(1 / 6)  # r=1.5 with A>0
    assert metrics["pg/clipfrac_low"] == pytest.approx(1 / 6)  # r=0.5 with A<0
    assert metrics["pg/dual_clipfrac"] == 0.0
    assert metrics["pg/ratio_mean"] == pytest.approx(9.1 / 6)  # (1.5+0.5+1.1+0.5+1.5+4) / 6
    assert (metrics["pg/ratio_min"], metrics["pg/ratio_max"]) == (pytest.approx(0.5), pytest.approx(4.0))
    sum_log = sum(math.log(r) for r in RATIOS.flatten().tolist())  # 0.906240
    assert metrics["pg/ppo_kl"] == pytest.approx(-sum_log / 6)  # k1 = -log r
    assert metrics["pg/approx_kl"] == pytest.approx((9.1 - 6 - sum_log) / 6)  # k3 = r - 1 - log r
    # d l / d log_prob = -A r where the unclipped term is active, 0 where clipped, 0 on padding:
    # row 0: [0 (clipped), -0.5, -1.1, 0]; row 1: [0 (clipped), 1.5, 4.0, 0]; all / 6 tokens.
    (grad,) = torch.autograd.grad(loss, log_prob)
    expected = torch.tensor([[0.0, -0.5, -1.1, 0.0], [0.0, 1.5, 4.0, 0.0]], dtype=torch.float64) / 6
    assert torch.allclose(grad, expected)


def test_policy_loss_dual_clip_bounds_negative_advantages_only():
    log_prob = LOG_PROB.clone().requires_grad_(True)
    loss, metrics = policy_loss(log_prob, OLD, ADV, PG_MASK, dual_clip=3.0)
    assert loss.item() == pytest.approx((sum(TOKEN_LOSS) - 4.0 + 3.0) / 6)  # 2.42 / 6
    assert metrics["pg/dual_clipfrac"] == pytest.approx(1 / 6)
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert grad[1, 2].item() == 0.0  # the dual-clipped token's loss is the constant 3
    # A positive advantage with a huge ratio is left alone by the dual clip: still -1.28 (clip high).
    one = torch.ones(1, 1)
    loss_pos, _ = policy_loss(5 * one, 0 * one, torch.tensor([1.0]), one, dual_clip=3.0)
    assert loss_pos.item() == pytest.approx(-1.28)


def test_policy_loss_seq_modes_and_per_token_advantages():
    # seq-mean-token-mean: row means (-1.28-0.5-1.1)/3 = -0.96 and (0.8+1.5+4)/3 = 2.1 -> 0.57
    loss, _ = policy_loss(LOG_PROB, OLD, ADV, PG_MASK, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-0.96 + 2.1) / 2)
    # seq-mean-token-sum-norm with L = 10: (-2.88/10 + 6.3/10) / 2 = 0.171
    loss, _ = policy_loss(LOG_PROB, OLD, ADV, PG_MASK, agg="seq-mean-token-sum-norm", norm_length=10)
    assert loss.item() == pytest.approx(0.171)
    # [B, T] advantages equal to the broadcast [B] ones, with nan on the padding, give the same loss.
    adv_bt = ADV[:, None].expand(2, 4).clone()
    adv_bt[:, 3] = NAN
    assert policy_loss(LOG_PROB, OLD, adv_bt, PG_MASK)[0].item() == pytest.approx(0.57)


def test_log_ratio_is_clamped_at_20_before_exp():
    # log-ratio 50 with A = -1 and no dual clip: the loss is the unclipped -A r = exp(20), not exp(50); no gradient.
    log_prob = torch.tensor([[50.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, metrics = policy_loss(log_prob, old, torch.tensor([-1.0]), torch.ones(1, 1), dual_clip=None)
    assert loss.item() == pytest.approx(math.exp(20.0))
    assert metrics["pg/ratio_max"] == pytest.approx(math.exp(20.0))
    assert torch.autograd.grad(loss, log_prob)[0].item() == 0.0
    # The default dual clip (c = 10, the paper's script) bounds the same token's loss by -A·c = 10.
    loss, metrics = policy_loss(log_prob, old, torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss.item() == 10.0 and metrics["pg/dual_clipfrac"] == 1.0


def test_clipped_surrogate_returns_the_matrix_and_clip_masks():
    loss_mat, clips = clipped_surrogate(RATIOS.log(), torch.tensor([1.0, -1.0]))
    assert torch.allclose(loss_mat.flatten(), torch.tensor(TOKEN_LOSS))
    assert clips.high.tolist() == [[True, False, False], [False, False, False]]
    assert clips.low.tolist() == [[False, False, False], [True, False, False]]
    assert not clips.dual.any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_low": -0.1}, "clip_low must be >= 0"),
        ({"clip_high": -0.2}, "clip_high must be >= 0"),
        ({"clip_low": 1.0}, "clip_low must be < 1"),
        ({"dual_clip": 0.5}, "dual_clip must be None or > 1"),
        ({"agg": "mean"}, "unknown aggregation mode 'mean'"),
        ({"old_log_prob": OLD[:, :3]}, "shape mismatch: old_log_prob"),
        ({"advantages": torch.ones(3)}, "shape mismatch: advantages"),
        ({"mask": PG_MASK[:1]}, "shape mismatch: mask"),
    ],
)
def test_policy_loss_bad_input(kwargs, message):
    args = {"log_prob": LOG_PROB, "old_log_prob": OLD, "advantages": ADV, "mask": PG_MASK, **kwargs}
    with pytest.raises(ValueError, match=message):
        policy_loss(**args)


def test_kl_estimators_by_hand():
    # x = logp - ref = [0.5, -1.0], third token padding (nan).
    #   k1 = x                  -> mean (0.5 - 1) / 2 = -0.25
    #   k2 = x^2 / 2            -> mean (0.125 + 0.5) / 2 = 0.3125
    #   k3 = exp(-x) + x - 1    -> [exp(-0.5) - 0.5, e - 2] = [0.106531, 0.718282], mean 0.412406
    log_prob = torch.tensor([[0.5, -1.0, NAN]])
    ref = torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    expected = {"k1": -0.25, "k2": 0.3125, "k3": (math.exp(-0.5) - 0.5 + math.e - 2) / 2}
    for name, value in expected.items():
        loss, metrics = kl_loss(log_prob, ref, mask, estimator=name)
        assert loss.item() == pytest.approx(value, rel=1e-6)
        assert metrics["kl/loss"] == pytest.approx(value, rel=1e-6)
    # k3 clamps x to ±20 and its value to 10: x = -30 -> min(exp(20) - 20 - 1, 10) = 10.
    assert kl_estimate(torch.tensor([[-30.0]]), torch.zeros(1, 1)).item() == 10.0
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'.*k1, k2, k3"):
        kl_estimate(log_prob, ref, "k4")
