"""verl adapter: registry, the MTP losses against verl's own `vanilla`, and `mtp_ppo_loss` through verl's `ppo_loss`.

Needs verl importable (CI: the light install of the Makefile, `verl --no-deps` plus ray, tensordict,
omegaconf, codetiming, orjson). The identities checked: with MTP log-probs equal to the main ones,
the MTP surrogate of a head *is* the main surrogate, so
    mtp_policy = vanilla + Σ_k (λ₀/K)·vanilla = (1 + λ₀)·vanilla
    occ        = vanilla + λ·vanilla,  λ = occ_coefficient(mtp, log_prob, old, mask, base=λ₀)
for every verl aggregation mode and global batch information (which must then be applied to the MTP
term exactly as verl applies it to the main one).
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("verl", reason="the verl adapter needs verl: pip install 'mtprl[verl]' (or the light install "
                                   "of the Makefile, docs/integrations.md)")
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.config.model import MtpConfig
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

import mtprl.integrations.verl as mverl
from mtprl.losses import occ_coefficient

VERL_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def actor_config(loss_mode="vanilla", agg="token-mean", coef=None, **kwargs):
    config = ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio_low=0.2, clip_ratio_high=0.28,
        loss_agg_mode=agg, policy_loss=PolicyLossConfig(loss_mode=loss_mode), **kwargs,
    )
    if coef is not None:  # where verl keeps its MTP loss weight: actor_rollout_ref.model.mtp.mtp_loss_scaling_factor
        config.model_config = SimpleNamespace(mtp=MtpConfig(mtp_loss_scaling_factor=coef))
    return config


def batch(seed=0):
    """old_log_prob, log_prob, advantages, response_mask: [B=3, R=5], with a ragged mask and large moves."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 5, generator=g) * 2
    sign = torch.randint(0, 2, (3, 5), generator=g) * 2 - 1
    log_prob = old + sign * (0.2 + 0.6 * torch.rand(3, 5, generator=g))  # |δ| >= 0.2, inside and outside the clip
    log_prob[0, :2] = old[0, :2]  # δ = 0 on two tokens: OCC's ĉ is then 8/10 (see below)
    adv = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    return old, log_prob, adv, mask


def test_losses_are_found_in_verls_registry_after_import():
    assert get_policy_loss_fn("occ").__name__ == "compute_policy_loss_mtp_occ"
    assert get_policy_loss_fn("mtp_policy").__name__ == "compute_policy_loss_mtp_policy"
    assert get_policy_loss_fn("vanilla").__name__ == "compute_policy_loss_vanilla"  # verl's own still there


@pytest.mark.parametrize("agg", VERL_MODES)
@pytest.mark.parametrize("num_heads", [1, 2])
def test_mtp_policy_is_one_plus_lambda_times_vanilla(agg, num_heads):
    old, log_prob, adv, mask = batch()
    config = actor_config(agg=agg, coef=0.3)
    # A data-parallel piece of a bigger batch: verl divides by global counts and multiplies by dp_size.
    config.global_batch_info.update(dp_size=2, batch_num_tokens=17, global_batch_size=6, loss_scale_factor=8)
    vanilla, _ = get_policy_loss_fn("vanilla")(old, log_prob, adv, mask, agg, config)
    mtp = log_prob.detach().clone()[None].repeat(num_heads, 1, 1).requires_grad_()
    loss, metrics = get_policy_loss_fn("mtp_policy")(old, log_prob, adv, mask, agg, config, mtp_log_prob=mtp)
    # λ_k = 0.3 / K for each of K identical heads: total 0.3, whatever K.
    assert loss.item() == pytest.approx(1.3 * vanilla.item(), rel=1e-5)
    assert metrics["actor/mtp/0/lambda"] == pytest.approx(0.3 / num_heads)
    assert "actor/pg_clipfrac" in metrics  # verl's own metrics are kept


def test_mtp_term_gradient_reaches_the_mtp_log_probs_scaled_by_lambda():
    old, log_prob, adv, mask = batch()
    config = actor_config(coef=0.3)
    main = log_prob.clone().requires_grad_()
    vanilla, _ = get_policy_loss_fn("vanilla")(old, main, adv, mask, "token-mean", config)
    (g_main,) = torch.autograd.grad(vanilla, main)
    mtp = log_prob.clone()[None].requires_grad_()
    loss, _ = get_policy_loss_fn("mtp_policy")(old, log_prob, adv, mask, "token-mean", config, mtp_log_prob=mtp)
    (g_mtp,) = torch.autograd.grad(loss, mtp)
    # d(λ·L(m))/dm = λ·dL/dℓ at m = ℓ; zero on padding.
    torch.testing.assert_close(g_mtp[0], 0.3 * g_main)
    assert g_mtp[0][~mask].abs().sum() == 0


@pytest.mark.parametrize("agg", VERL_MODES)
def test_occ_is_vanilla_plus_occ_lambda_times_vanilla(agg):
    old, log_prob, adv, mask = batch()
    config = actor_config(agg=agg, coef=0.3)
    config.global_batch_info.update(dp_size=1, batch_num_tokens=10, global_batch_size=3)
    vanilla, _ = get_policy_loss_fn("vanilla")(old, log_prob, adv, mask, agg, config)
    lam, _ = occ_coefficient(log_prob, log_prob, old, mask, base=0.3)
    # With m = ℓ: μ = δ, so each token contributes δ²/(δ²+ε) = 1 where δ ≠ 0 and 0 where δ = 0.
    # 10 valid tokens, 2 of them with δ = 0  ->  ĉ = 8/10, λ = 0.3 · 0.8 = 0.24.
    assert lam.item() == pytest.approx(0.24, rel=1e-6)
    loss, metrics = get_policy_loss_fn("occ")(old, log_prob, adv, mask, agg, config, mtp_log_prob=log_prob[None])
    assert loss.item() == pytest.approx(vanilla.item() + lam.item() * vanilla.item(), rel=1e-5)
    assert metrics["actor/mtp/0/lambda"] == pytest.approx(0.24, rel=1e-6)
    assert metrics["actor/mtp/0/c_hat"] == pytest.approx(0.8, rel=1e-6)


def test_occ_lambda_is_zero_on_the_first_step_after_a_rollout():
    old, _, adv, mask = batch()
    config = actor_config(coef=0.3)
    mtp = old[None] - 0.5  # the MTP head disagrees with π_old, but the main head has not moved (δ ≡ 0)
    loss, metrics = get_policy_loss_fn("occ")(old, old, adv, mask, "token-mean", config, mtp_log_prob=mtp)
    vanilla, _ = get_policy_loss_fn("vanilla")(old, old, adv, mask, "token-mean", config)
    assert metrics["actor/mtp/0/lambda"] == 0.0
    assert loss.item() == pytest.approx(vanilla.item())


def test_default_coefficient_without_an_mtp_config_is_the_papers():
    old, log_prob, adv, mask = batch()
    config = actor_config()  # model_config carries no `mtp` section
    vanilla, _ = get_policy_loss_fn("vanilla")(old, log_prob, adv, mask, "token-mean", config)
    loss, _ = get_policy_loss_fn("mtp_policy")(old, log_prob, adv, mask, "token-mean", config,
                                                mtp_log_prob=log_prob[None])
    assert loss.item() == pytest.approx(1.1 * vanilla.item(), rel=1e-5)


def test_aggregation_options_mirror_verls_agg_loss():
    info = {"dp_size": 4, "batch_num_tokens": 40, "global_batch_size": 8, "loss_scale_factor": None}
    mask = torch.ones(2, 7)
    assert mverl.verl_aggregation("token-mean", info, mask) == ({"agg": "token-mean", "global_tokens": 40}, 4)
    assert mverl.verl_aggregation("token-sum", info, mask) == ({"agg": "token-mean", "global_tokens": 1}, 4)
    # seq-mean-token-sum-norm divides by the padded response length when no loss_scale_factor is set
    assert mverl.verl_aggregation("seq-mean-token-sum-norm", info, mask) == (
        {"agg": "seq-mean-token-sum-norm", "global_seqs": 8, "norm_length": 7}, 4)
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        mverl.verl_aggregation("seq-sum", info, mask)


def verl_batch(K):
    """A verl actor micro-batch in padded layout (left-padded prompts, right-padded responses)."""
    prompts = torch.tensor([[5, 6, 7], [0, 8, 9]])
    responses = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0]])
    g = torch.Generator().manual_seed(1)
    old, adv = -torch.rand(2, 4, generator=g), torch.randn(2, 4, generator=g)
    data = tu.get_tensordict(
        {"prompts": prompts, "responses": responses, "attention_mask": attention,
         "response_mask": attention[:, 3:], "old_log_probs": old, "advantages": adv},
        {"dp_size": 1, "batch_num_tokens": 6, "global_batch_size": 2},
    )
    log_probs = -torch.rand(int(attention.sum()), generator=g)  # [total tokens], verl's unpadded layout
    return data, log_probs


def test_mtp_ppo_loss_runs_verls_ppo_loss_with_the_mtp_term():
    data, log_probs = verl_batch(K=2)
    # head 0 equals the main head; head 1 sits 0.5 nats lower on every token
    mtp = torch.stack([log_probs, log_probs - 0.5], dim=-1)  # [total tokens, K=2]
    base, _ = ppo_loss(actor_config(), {"log_probs": log_probs}, data)
    shifted, _ = ppo_loss(actor_config(), {"log_probs": log_probs - 0.5}, data)
    loss, metrics = mverl.mtp_ppo_loss(actor_config("mtp_policy", coef=0.3), {"log_probs": log_probs,
                                                                              "mtp_log_probs": mtp}, data)
    # λ_k = 0.3 / 2 each: vanilla(ℓ) + 0.15·vanilla(ℓ) + 0.15·vanilla(ℓ − 0.5), all through verl's own slicing
    assert loss.item() == pytest.approx(base.item() + 0.15 * base.item() + 0.15 * shifted.item(), rel=1e-5)
    assert "actor/mtp/1/lambda" in metrics


def test_missing_mtp_log_probs_say_what_to_patch():
    old, log_prob, adv, mask = batch()
    with pytest.raises(ValueError, match="mtp_ppo_loss"):
        get_policy_loss_fn("occ")(old, log_prob, adv, mask, "token-mean", actor_config())
    data, log_probs = verl_batch(K=1)
    with pytest.raises(ValueError, match="no 'mtp_log_probs'"):
        mverl.mtp_ppo_loss(actor_config("occ"), {"log_probs": log_probs}, data)
    with pytest.raises(ValueError, match="no verl policy loss"):
        mverl.make_policy_loss("frozen")


def test_packed_layout_lands_on_the_response_tokens_verl_slices():
    data, _ = verl_batch(K=2)
    attention = data["attention_mask"]  # [B, P + R] = [2, 7], P = 3
    # ours[k, b, t] = head k's log-prob of the token at padded position t; make every entry identifiable
    ours = -(torch.arange(2 * 2 * 7, dtype=torch.float32).reshape(2, 2, 7) + 1) / 100
    packed = mverl.verl_packed_mtp_log_probs(ours, attention)
    assert packed.is_nested and packed.values().shape == (int(attention.sum()), 2)
    response = no_padding_2_padding(packed, data)  # [B, R, K], verl's own slicing of model outputs
    # Response token r of row b sits at padded position 3 + r, so it must carry ours[k, b, 3 + r];
    # row 1 has 2 response tokens (positions 3, 4), its 2 padded slots are 0.
    expected = ours[:, :, 3:].permute(1, 2, 0) * data["response_mask"][..., None]
    torch.testing.assert_close(response, expected)
