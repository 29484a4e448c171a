"""Speculative decoding with the MTP layer as drafter, verified by the main model in one pass.

One verify step, for a batch where x_{T-1} is the last committed token (not yet fed to the trunk)
and s_{T-2} the depth-1 MTP state at source T-2 (inputs h_{T-2}, Emb(x_{T-1})):
  1. draft: x̂_T ~ q_1 = MTP logits of s_{T-2}; for d = 2..D the same MTP layer runs at the next
     source position on (its own previous output state, Emb(x̂ just drafted)) — see departures;
  2. verify: the trunk takes [x_{T-1}, x̂_T .. x̂_{T+D-1}] in one forward pass, giving the main
     policy p_0..p_D at those positions; `greedy_accept` / `speculative_accept` (sampling.py)
     keep n ≤ D drafts and choose one more token (correction or bonus);
  3. catch up: the MTP layer runs once over the same D+1 slots on the true trunk states and the
     committed tokens, which refreshes its cache and yields s at the new last source position.
Both caches gain the same D+1 slots per step; slots past the accepted ones are masked out in
the shared mask (holes), and the temporary draft slots of step 1 are cropped from the MTP cache
before verification, so each cache only ever holds states of committed tokens.

Departures from MiMo / DeepSeek-V3 multi-layer drafting:
  - Only the depth-1 MTP layer drafts. Drafts 2..D reuse it autoregressively (as vLLM and
    SGLang do for MTP drafting beyond the trained depths), feeding its own output state where
    the trunk state would go (after its final norm where the family's layout says so, `mtp_carry`); with K > 1 MTP layers, layers 2..K are not used for drafting
    (their caches would need re-computation of recent slots after every rejection).
  - Draft tokens are sampled from the MTP distribution after the same temperature / top-k /
    top-p filters as the main policy (any proposal keeps the output exact; this one matches).
"""

from __future__ import annotations

import torch

from mtprl.model import MTPCausalLM
from mtprl.rollout.batch import DecodeState, ResponseBuffer, compact, grouped_query_sdpa
from mtprl.rollout.cache import SlotCache
from mtprl.rollout.sampling import SamplingParams, Source, draw, greedy_accept, policy_log_probs, speculative_accept


def prefill_mtp(model: MTPCausalLM, hidden: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                pos: torch.Tensor) -> SlotCache:
    """MTP cache over prompt source slots 0..P-2, whose next token is known (hidden [U, P, d])."""
    cache = SlotCache()
    if prompt_ids.shape[1] > 1:
        with grouped_query_sdpa(model.device):
            model.mtp_hidden(0, hidden[:, :-1], prompt_ids[:, 1:], prompt_mask[:, :-1].long(), pos[:, :-1],
                             past_key_values=cache, use_cache=True)
    return cache


def catch_up(model: MTPCausalLM, state: DecodeState, hidden: torch.Tensor, next_ids: torch.Tensor,
             pos: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """Feed the MTP layer the slots the trunk just took; return its state at slot `pick` [B].

    hidden [B, s, d] trunk states of the new slots, next_ids [B, s] the token after each slot's
    own (committed where the slot is), pos [B, s]; state.mask already covers the new slots.
    Returns [B, d].
    """
    out = model.mtp_hidden(0, hidden, next_ids, state.mask, pos, past_key_values=state.mtp_cache, use_cache=True)
    return out[torch.arange(out.shape[0], device=out.device), pick]


def draft(model: MTPCausalLM, state: DecodeState, params: SamplingParams, generator: Source
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft D tokens per row: (drafts [B, D], their proposal log-probs q [B, D, V])."""
    B, D = state.last.shape[0], params.draft_tokens
    h, tokens, q = state.draft_hidden, [], []
    for d in range(D):
        lp = policy_log_probs(model.mtp_logits(0, h), params)  # [B, V]
        tokens.append(draw(lp, params.greedy, generator, state.rows))
        q.append(lp)
        if d + 1 < D:  # next draft: source next_pos + d, inputs (own state, draft just made)
            mask = torch.cat([state.mask, state.mask.new_ones(B, d + 1)], dim=1)
            h = model.mtp_hidden(0, model.mtp_carry(0, h)[:, None], tokens[-1][:, None], mask,
                                 (state.next_pos + d)[:, None],
                                 past_key_values=state.mtp_cache, use_cache=True)[:, 0]
    if D > 1:
        state.mtp_cache.crop(-(D - 1))  # drop the draft-only slots again
    return torch.stack(tokens, 1), torch.stack(q, 1)


def verify_step(model: MTPCausalLM, state: DecodeState, buffer: ResponseBuffer, params: SamplingParams,
                generator: Source, accepted: torch.Tensor) -> int:
    """One draft-verify-catch-up step; adds per-depth acceptances to accepted [D]; returns rows verified."""
    drafts, q = draft(model, state, params, generator)
    B, D = drafts.shape
    offsets = torch.arange(D + 1, device=drafts.device)
    pos = state.next_pos[:, None] + offsets  # [B, D+1]
    fed = torch.cat([state.last[:, None], drafts], dim=1)  # [B, D+1]
    verify_mask = torch.cat([state.mask, state.mask.new_ones(B, D + 1)], dim=1)
    hidden, _ = model.trunk(fed, verify_mask, pos, state.cache, use_cache=True)  # [B, D+1, d]
    target = policy_log_probs(model.logits(hidden), params)  # [B, D+1, V]
    if params.greedy:
        n_acc, nxt = greedy_accept(target, drafts)
    else:
        n_acc, nxt = speculative_accept(target, q, drafts, generator, state.rows)

    committed = torch.cat([drafts, nxt[:, None]], dim=1).scatter(1, n_acc[:, None], nxt[:, None])  # [B, D+1]
    alive = buffer.alive(state.rows)
    accepted += ((n_acc[:, None] > offsets[:D]) & alive[:, None]).sum(0)
    buffer.commit(state.rows, committed, target.gather(-1, committed[..., None]).squeeze(-1), n_acc + 1)

    state.extend_mask(offsets <= n_acc[:, None])
    state.draft_hidden = catch_up(model, state, hidden, committed, pos, n_acc)
    state.next_pos = state.next_pos + n_acc + 1
    state.last = nxt
    return int(alive.sum())


def decode(model: MTPCausalLM, state: DecodeState, buffer: ResponseBuffer, params: SamplingParams,
           generator: Source) -> dict[str, float]:
    """Verify steps until every row has finished; returns the acceptance counters as metrics."""
    D = params.draft_tokens
    accepted = torch.zeros(D, dtype=torch.long, device=state.mask.device)
    steps = rows_verified = 0
    with grouped_query_sdpa(model.device):
        while (state := compact(state, buffer)) is not None:
            rows_verified += verify_step(model, state, buffer, params, generator, accepted)
            steps += 1
    per_depth = (accepted.double() / max(rows_verified, 1)).tolist()
    metrics = {f"rollout/accept_rate/{d}": per_depth[d] for d in range(D)}
    metrics["rollout/mean_accepted"] = sum(per_depth)
    metrics["rollout/accept_rate"] = sum(per_depth) / D
    metrics["rollout/verify_steps"] = float(steps)
    return metrics
