"""Batched generation for `MTPCausalLM`: n samples per prompt, KV cache, optional MTP drafting.

The engine deals in token ids only (no text, no rewards). `generate` left-pads the prompts, runs
the trunk once per distinct prompt and copies its cache to the prompt's n samples, then decodes
one token per step (or, with `draft_tokens` = D > 0, up to D+1 tokens per verify step, see
speculative.py), dropping finished rows from the batch as it goes. Runs in eval mode (the
model's mode is restored afterwards) under `torch.no_grad()` — not inference mode, so the
returned tensors can enter a training forward.

Metrics: "rollout/tokens_per_s" counts response tokens over the whole call (prefill included);
"rollout/verify_steps" counts batched main-model decode forwards after the prefill;
"rollout/accept_rate/{d}" is the fraction of (row, verify step) pairs whose draft d was
accepted (it needs drafts 0..d-1 accepted too, as in vLLM), "rollout/mean_accepted" their sum
(accepted drafts per row and verify step) and "rollout/accept_rate" that sum over D.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from mtprl.model import MTPCausalLM
from mtprl.rollout import lean, speculative
from mtprl.rollout.batch import DecodeState, ResponseBuffer, compact, left_pad, prefill
from mtprl.rollout.sampling import PromptGenerators, SamplingParams, Source, draw, policy_log_probs


@dataclasses.dataclass
class Rollout:
    """Sampled responses, N = len(prompts) * n rows, prompt-major (rows i*n..(i+1)*n-1 are prompt i's)."""

    prompt_ids: torch.Tensor  # [N, P] int64, left-padded with the pad id
    prompt_mask: torch.Tensor  # [N, P] bool
    response_ids: torch.Tensor  # [N, R] int64, R = longest response; pad id after a response ends
    response_mask: torch.Tensor  # [N, R] bool (the EOS / stop token is inside the mask)
    log_probs: torch.Tensor  # [N, R] float32, log-prob under the distribution sampled from; 0 where masked
    lengths: torch.Tensor  # [N] int64 response lengths
    finish_reasons: list[str]  # per row: "stop" (EOS / stop token) or "length" (max_new_tokens)
    prompt_index: torch.Tensor  # [N] int64, index of each row's prompt
    metrics: dict[str, float]  # rollout/tokens_per_s, rollout/mean_accepted, rollout/accept_rate, ...


def generate(model: MTPCausalLM, prompts: list[list[int]], params: SamplingParams,
             eos_token_id: int | None = None, generator: Source = None) -> Rollout:
    """Sample `params.n` responses for every prompt (lists of token ids) from `model`.

    `generator`: a `torch.Generator` (its numbers go to the rows in batch order), `PromptGenerators` with
    one seed per prompt (a prompt's responses then do not depend on the other prompts of the call), or
    None (torch's global generator)."""
    check_request(model, prompts, params, eos_token_id, generator)
    stop_ids = list(params.stop_token_ids) + ([eos_token_id] if eos_token_id is not None else [])
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    n, num_rows = params.n, len(prompts) * params.n
    was_training = model.training
    started = time.perf_counter()
    try:
        model.eval()
        with torch.no_grad():
            prompt_ids, prompt_mask = left_pad(prompts, pad_id, model.device)  # [U, P]
            buffer = ResponseBuffer(num_rows, params.max_new_tokens, stop_ids, pad_id, model.device)
            state = start(model, prompt_ids, prompt_mask, params, buffer, generator)
            if params.draft_tokens:
                metrics = speculative.decode(model, state, buffer, params, generator)
            else:
                metrics = decode(model, state, buffer, params, generator)
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - started
    width = max(int(buffer.lengths.max()), 1)
    response_mask = torch.arange(width, device=model.device) < buffer.lengths[:, None]
    metrics["rollout/tokens_per_s"] = float(buffer.lengths.sum()) / max(elapsed, 1e-9)
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(n, 0), prompt_mask=prompt_mask.repeat_interleave(n, 0),
        response_ids=buffer.ids[:, :width].clone(), response_mask=response_mask,
        log_probs=buffer.log_probs[:, :width].clone(), lengths=buffer.lengths,
        finish_reasons=buffer.finish_reasons(),
        prompt_index=torch.arange(len(prompts), device=model.device).repeat_interleave(n), metrics=metrics,
    )


def start(model: MTPCausalLM, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams,
          buffer: ResponseBuffer, generator: Source) -> DecodeState:
    """Prefill the distinct prompts [U, P], copy to n rows each, sample and commit the first token."""
    n = params.n
    hidden, pos, cache = prefill(model, prompt_ids, prompt_mask)  # [U, P, d]
    mtp_cache = speculative.prefill_mtp(model, hidden, prompt_ids, prompt_mask, pos) if params.draft_tokens else None
    if n > 1:
        for c in (cache, mtp_cache):
            if c is not None:
                c.batch_repeat_interleave(n)
    last_hidden = hidden[:, -1].repeat_interleave(n, 0)  # [N, d]
    lp = policy_log_probs(model.logits(last_hidden), params)  # [N, V]
    rows = torch.arange(last_hidden.shape[0], device=model.device)
    token = draw(lp, params.greedy, generator, rows)
    buffer.commit(rows, token[:, None], lp.gather(1, token[:, None]))
    state = DecodeState(rows=rows, mask=prompt_mask.long().repeat_interleave(n, 0),
                        next_pos=pos[:, -1].repeat_interleave(n) + 1, last=token, cache=cache, mtp_cache=mtp_cache)
    if params.draft_tokens:  # the MTP layer's slot for the last prompt token needs the token just sampled
        src = (state.next_pos - 1)[:, None]
        state.draft_hidden = speculative.catch_up(model, state, last_hidden[:, None], token[:, None], src,
                                                  torch.zeros_like(rows))
    return state


def decode(model: MTPCausalLM, state: DecodeState, buffer: ResponseBuffer, params: SamplingParams,
           generator: Source) -> dict[str, float]:
    """Plain decoding, one token per row per trunk forward, until every row has finished."""
    steps, use_lean = 0, lean.supported(model)
    while (state := compact(state, buffer)) is not None:
        state.extend_mask(state.mask.new_ones(state.mask.shape[0], 1))
        if use_lean:  # the same states as the trunk's forward, bit for bit, at a fraction of the calls
            hidden = lean.decode_step(model, state.last, state.mask, state.next_pos, state.cache)  # [B, 1, d]
        else:
            hidden, _ = model.trunk(state.last[:, None], state.mask, state.next_pos[:, None], state.cache,
                                    use_cache=True)  # [B, 1, d]
        lp = policy_log_probs(model.logits(hidden[:, -1]), params)  # [B, V]
        token = draw(lp, params.greedy, generator, state.rows)
        buffer.commit(state.rows, token[:, None], lp.gather(1, token[:, None]))
        state.next_pos = state.next_pos + 1
        state.last = token
        steps += 1
    return {"rollout/mean_accepted": 0.0, "rollout/accept_rate": 0.0, "rollout/verify_steps": float(steps)}


def check_request(model, prompts, params, eos_token_id, generator) -> None:
    """Raise a ValueError / TypeError naming the problem and the fix for any bad argument."""
    if not isinstance(model, MTPCausalLM):
        raise TypeError(f"model must be an MTPCausalLM, got {type(model).__name__}; wrap a causal LM with "
                        "MTPCausalLM(base, num_mtp_layers)")
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists; pass at least one prompt")
    vocab, context = model.vocab_size, model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise ValueError(f"prompt {i} must be a list of int token ids, got {type(p).__name__}")
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}) of this model's vocabulary; "
                             "encode it with this model's tokenizer")
        if len(p) + params.max_new_tokens > context:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} it needs "
                             f"{len(p) + params.max_new_tokens} positions but the model's context is {context}; "
                             "shorten the prompt or lower max_new_tokens")
    for name, ids in (("eos_token_id", [] if eos_token_id is None else [eos_token_id]),
                      ("stop_token_ids", params.stop_token_ids)):
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"{name} must be token ids in [0, {vocab}), got {ids!r}")
    if generator is not None and not isinstance(generator, (torch.Generator, PromptGenerators)):
        raise TypeError(f"generator must be a torch.Generator, PromptGenerators or None, got "
                        f"{type(generator).__name__}")
    if isinstance(generator, PromptGenerators) and (len(generator) != len(prompts) or generator.n != params.n):
        raise ValueError(f"PromptGenerators holds {len(generator)} seeds for n={generator.n} samples, but "
                         f"{len(prompts)} prompts with n={params.n} were asked; build it with one seed per prompt "
                         "and the same n")
    if generator is not None and generator.device.type != model.device.type:
        raise ValueError(f"generator is on {generator.device} but the model on {model.device}; create it with "
                         f"torch.Generator(device={str(model.device)!r})")
