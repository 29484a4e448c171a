"""verl adapter (verl 0.9.x): the `occ` and `mtp_policy` policy losses in verl's registry.

How verl 0.9 computes the actor loss. The training engine's forward puts per-token `log_probs` in
`model_output`; `verl.workers.utils.losses.ppo_loss(config, model_output, data)` writes the global
batch information into `config.global_batch_info` (dp_size, batch_num_tokens, global_batch_size,
loss_scale_factor), looks the policy loss up with `get_policy_loss_fn(config.policy_loss.loss_mode)`
and calls it with the keywords old_log_prob, log_prob, advantages, response_mask (all
`[B, R]`, R = response length), loss_agg_mode, config (the actor config) and rollout_is_weights.

Importing this module registers, through verl's `register_policy_loss`:
- `mtp_policy`: verl's own `vanilla` loss + Σ_k λ_k·L_k with fixed λ_k = λ₀ / K;
- `occ`:        the same with λ_k = (λ₀ / K)·ĉ_k, the OCC proxy of `mtprl.losses.occ_coefficient`.
The main term *is* verl's `vanilla` (same clip, dual clip, rollout weights, aggregation). The MTP
term is `mtprl.losses.mtp_loss` with verl's clip_ratio_low / clip_ratio_high, `clip_ratio_c` as the
dual clip, verl's `loss_agg_mode` and the global counts of `config.global_batch_info`, times
dp_size: exactly what `verl.trainer.ppo.core_algos.agg_loss` does to the main term. λ₀ is verl's
own MTP loss weight `actor_rollout_ref.model.mtp.mtp_loss_scaling_factor` (default 0.1, the
paper's), or `coef` of `make_policy_loss` for losses you register yourself.

What verl 0.9.1 does not do, and the user must patch (examples/verl_recipe.md gives the code):
1. No engine computes MTP log-probs for the policy loss. The FSDP engine's `prepare_model_outputs`
   scores only the main head's logits; the Megatron engine turns the MTP logits into its own
   cross-entropy inside the patched `GPTModel._postprocess` (verl/models/mcore/mtp_patch.py).
   The engine must put `model_output["mtp_log_probs"]`: the main `log_probs` layout (nested
   `[bsz, j]` in verl's no-padding mode) with a trailing head dimension K, where entry (i, k) is
   head k's log-prob of token i+1 — the token that `log_probs[i]` scores (verl's rolled labels).
   `verl_packed_mtp_log_probs` turns `MTPCausalLM.token_log_probs` output into that layout.
2. `ppo_loss` calls the policy loss with a fixed argument list, so MTP log-probs cannot reach it.
   Set the actor's loss function to `mtp_ppo_loss` (a wrapper that runs verl's own `ppo_loss`
   unchanged and hands the MTP log-probs to our losses) instead of `ppo_loss`.
And with `mtp.enable_train=True` the Megatron engine also adds its own MTP cross-entropy, weighted
by the same `mtp_loss_scaling_factor`; the recipe's Megatron patch replaces it, so that the MTP head
is trained by one loss only.

Departures (from the paper's verl patch and from our own trainer):
- OCC's ĉ is computed per micro-batch on each rank (verl gives the policy loss no process group),
  over the micro-batch's valid response tokens (masked mean, see `mtprl.losses.occ`).
- Rollout-correction weights (`rollout_is_weights`) reweight the main term only.
- Every head is normalised by the main head's global counts (verl provides only those); MTP
  positions are valid wherever the response mask is, which holds when prompts exceed K tokens.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, register_policy_loss
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from mtprl.losses import get_regime, mtp_loss

DEFAULT_COEF = 0.1  # λ₀ when the actor config carries no `model_config.mtp` (the paper's value)
LOSS_NAMES = {"mtp_policy": "policy", "occ": "occ"}  # verl loss name -> mtprl regime, registered at import

MISSING_MTP_LOG_PROBS = (
    "the MTP policy losses need MTP log-probs, but none reached them. verl 0.9 does not compute them: "
    "patch the engine to put model_output['mtp_log_probs'] (see mtprl.integrations.verl) and use "
    "mtp_ppo_loss as the actor loss function, or pass mtp_log_prob=[K, B, R] when calling the loss directly"
)

_PENDING_MTP: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("mtprl_verl_mtp_log_prob", default=None)


@contextlib.contextmanager
def pending_mtp_log_prob(mtp_log_prob: Tensor) -> Iterator[None]:
    """Within the block, the MTP policy losses read `mtp_log_prob [K, B, R]` when not passed one."""
    token = _PENDING_MTP.set(mtp_log_prob)
    try:
        yield
    finally:
        _PENDING_MTP.reset(token)


def mtp_ppo_loss(config, model_output: dict, data, dp_group=None) -> tuple[Tensor, dict[str, Any]]:
    """verl's actor loss `ppo_loss`, unchanged, with `model_output["mtp_log_probs"]` handed to our losses.

    Use it where verl sets `partial(ppo_loss, config=actor_config)` (verl/workers/engine_workers.py)
    or through `set_loss_fn`. `mtp_log_probs` has the layout of `model_output["log_probs"]` plus a
    trailing head dimension K (omitted when K = 1).
    """
    packed = model_output.get("mtp_log_probs")
    if packed is None:
        raise ValueError("model_output has no 'mtp_log_probs'; " + MISSING_MTP_LOG_PROBS)
    mtp = no_padding_2_padding(packed, data)  # [B, R, K] or [B, R]
    mtp = mtp[None] if mtp.ndim == 2 else mtp.movedim(-1, 0)  # [K, B, R]
    with pending_mtp_log_prob(mtp):
        return ppo_loss(config, model_output, data, dp_group)


def verl_packed_mtp_log_probs(mtp_log_probs: Tensor, attention_mask: Tensor) -> Tensor:
    """Our aligned MTP log-probs in the layout `mtp_ppo_loss` expects of `model_output["mtp_log_probs"]`.

    `mtp_log_probs [K, B, L]` indexed by target position (as `MTPCausalLM.token_log_probs` returns
    them), `attention_mask [B, L]` with contiguous real tokens (left or right padding). Returns a
    nested jagged `[B, j_b, K]` tensor over each sequence's real tokens, rolled as verl rolls its
    labels: row i holds the heads' log-probs of real token i + 1 (0 on each sequence's last token).
    """
    mask = attention_mask.bool()  # [B, L]
    nxt = torch.zeros_like(mtp_log_probs)  # [K, B, L]
    nxt[..., :-1] = torch.where(mask[:, 1:], mtp_log_probs[..., 1:], 0.0)
    values = nxt.permute(1, 2, 0)[mask]  # [total tokens, K], sequence by sequence
    offsets = torch.cat([mask.new_zeros(1, dtype=torch.long), mask.sum(-1).cumsum(0)])
    return torch.nested.nested_tensor_from_jagged(values, offsets)


def verl_aggregation(
    loss_agg_mode: str, global_batch_info: dict, response_mask: Tensor
) -> tuple[dict[str, Any], int]:
    """(`mtprl.losses.aggregate` options, dp_size factor) that reproduce verl's `agg_loss`.

    verl: token-mean Σl / batch_num_tokens; token-sum Σl; seq-mean-token-{mean,sum} Σ_b(...) /
    global_batch_size; seq-mean-token-sum-norm additionally / loss_scale_factor (default: the
    padded response length R); every mode then × dp_size. Missing counts fall back to local ones.
    """
    info = global_batch_info or {}
    dp_size = int(info.get("dp_size") or 1)
    if loss_agg_mode == "token-sum":
        return {"agg": "token-mean", "global_tokens": 1}, dp_size
    if loss_agg_mode == "token-mean":
        return {"agg": "token-mean", "global_tokens": info.get("batch_num_tokens")}, dp_size
    if loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        options = {"agg": loss_agg_mode, "global_seqs": info.get("global_batch_size")}
        if loss_agg_mode == "seq-mean-token-sum-norm":
            options["norm_length"] = info.get("loss_scale_factor") or response_mask.shape[-1]
        return options, dp_size
    raise ValueError(
        f"unknown loss_agg_mode {loss_agg_mode!r}; verl's modes are token-mean, token-sum, "
        "seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm"
    )


def _base_coef(config, coef: float | None) -> float:
    """λ₀: `coef` if given, else the actor's `model_config.mtp.mtp_loss_scaling_factor`, else 0.1."""
    if coef is not None:
        return float(coef)
    mtp_config = getattr(getattr(config, "model_config", None), "mtp", None)
    return float(getattr(mtp_config, "mtp_loss_scaling_factor", DEFAULT_COEF))


def _clip_range(config) -> tuple[float, float, float]:
    """(clip_low, clip_high, dual_clip) read from the actor config the way verl's `vanilla` reads them."""
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return low, high, config.get("clip_ratio_c", 3.0)


def make_policy_loss(
    regime: str,
    *,
    coef: float | None = None,
    occ_estimator: str = "mean-ratio",
    occ_clip: tuple[float, float] | None = None,
    occ_eps: float = 1e-8,
) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """A verl policy loss: `vanilla` + the MTP term of `regime`, any registered regime with a term that
    needs no exact slopes (policy, occ, ce, detach, detach-mtp-only, or one you registered).

    Register it under your own name with `verl.trainer.ppo.core_algos.register_policy_loss(name)`.
    `coef` fixes λ₀ (default: read from the actor config, see `_base_coef`); the occ options are
    those of `mtprl.losses.mtp_loss`. A loss cannot set the model's detach switches: for the detach
    regimes, detach in the engine (the authors' `detach_encoder=True` for `detach`).
    """
    spec = get_regime(regime)
    if not spec.has_term or spec.needs_exact_slopes:
        why = ("has no MTP term: verl's own 'vanilla' loss is that regime" if not spec.has_term else
               "needs exact slopes, i.e. two backward passes that a policy loss cannot make")
        raise ValueError(f"regime {regime!r} has no verl policy loss: it {why}")

    def policy_loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: Tensor | None = None,
        *,
        mtp_log_prob: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        """verl's policy-loss signature; `mtp_log_prob [K, B, R]` defaults to the one `mtp_ppo_loss` hands over."""
        if config is None:
            raise ValueError("the MTP policy losses need verl's actor config (clip ratios, global batch info)")
        mtp = mtp_log_prob if mtp_log_prob is not None else _PENDING_MTP.get()
        if mtp is None:
            raise ValueError(MISSING_MTP_LOG_PROBS)
        mtp = mtp[None] if mtp.ndim == 2 else mtp  # [K, B, R]
        main, metrics = compute_policy_loss_vanilla(
            old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
        )
        agg_options, dp_size = verl_aggregation(loss_agg_mode, config.global_batch_info, response_mask)
        clip_low, clip_high, dual_clip = _clip_range(config)
        mask = response_mask.bool()
        term, mtp_metrics = mtp_loss(
            regime, mtp_log_prob=mtp, mtp_mask=mask[None].expand_as(mtp), log_prob=log_prob,
            old_log_prob=old_log_prob, advantages=advantages, coef=_base_coef(config, coef),
            clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, occ_estimator=occ_estimator,
            occ_clip=occ_clip, occ_eps=occ_eps, **agg_options,
        )
        metrics.update({f"actor/{name}": value for name, value in mtp_metrics.items()})
        return main + term * dp_size, metrics

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_mtp_{regime.replace('-', '_')}"
    return policy_loss


register_policy_loss("mtp_policy")(make_policy_loss(LOSS_NAMES["mtp_policy"]))
register_policy_loss("occ")(make_policy_loss(LOSS_NAMES["occ"]))

__all__ = [
    "DEFAULT_COEF", "LOSS_NAMES", "make_policy_loss", "mtp_ppo_loss", "pending_mtp_log_prob", "verl_aggregation",
    "verl_packed_mtp_log_probs",
]
