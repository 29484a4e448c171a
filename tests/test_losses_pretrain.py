"""The pre-training loss (NTP + weighted mean MTP cross-entropy) against hand-computed values."""

import pytest
import torch

from mtprl.losses.pretrain import pretrain_loss


def test_pretrain_loss_by_hand():
    # One sequence of 4 tokens, K = 2 depths. Main head valid at t=1..3, loss mask on t=2,3:
    # main NLL = -(-1 + -3)/2 = 2. Depth 1 valid at t=2,3 (both in the loss mask): -(-2 + -4)/2 = 3.
    # Depth 2 valid at t=3 only: -(-5)/1 = 5. MTP mean = (3 + 5)/2 = 4. Loss = 2 + 0.5 * 4 = 4.
    loss, metrics = pretrain_loss(
        log_probs=torch.tensor([[0.0, -7.0, -1.0, -3.0]]),
        mask=torch.tensor([[False, True, True, True]]),
        mtp_log_probs=torch.tensor([[[0.0, 0.0, -2.0, -4.0]], [[0.0, 0.0, 0.0, -5.0]]]),
        mtp_mask=torch.tensor([[[False, False, True, True]], [[False, False, False, True]]]),
        loss_mask=torch.tensor([[False, False, True, True]]),
        mtp_weight=0.5,
    )
    assert loss.item() == pytest.approx(4.0)
    assert metrics == pytest.approx({"loss": 4.0, "main_nll": 2.0, "mtp1_nll": 3.0, "mtp2_nll": 5.0})


def test_pretrain_loss_gradient_reaches_only_masked_targets():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    mtp = torch.tensor([[[-1.0, -2.0, -3.0]]], requires_grad=True)
    mask = torch.tensor([[True, True, True]])
    loss_mask = torch.tensor([[False, True, True]])
    loss, _ = pretrain_loss(log_probs, mask, mtp, mask.unsqueeze(0), loss_mask, mtp_weight=0.3)
    loss.backward()
    # main: -(lp1 + lp2)/2 -> d/dlp = -0.5 on the two targets; MTP: 0.3 * the same
    assert log_probs.grad.tolist() == [[0.0, -0.5, -0.5]]
    assert mtp.grad[0, 0].tolist() == pytest.approx([0.0, -0.15, -0.15])
