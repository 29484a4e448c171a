"""Per-token log-probs of given targets without materialising full-vocabulary logits.

`chunked_target_log_probs` projects hidden states onto the output head a chunk of rows at a
time, keeps only each row's log-sum-exp and target logit, and in the backward pass recomputes
each chunk's logits to form the gradient. Peak memory is then O(chunk × V) instead of O(N × V)
for forward *and* backward (a plain chunked loop under autograd would still save every chunk's
logits for backward). Entropy and the top-1 match are by-products of the same pass, no grad.
"""

from __future__ import annotations

import torch


class _ChunkedTargetLogProb(torch.autograd.Function):
    """log softmax(h Wᵀ / τ)[target] for rows of h, computed and differentiated chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):
        n = hidden.shape[0]  # hidden [N, d], weight [V, d], targets [N]
        out = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_zeros(n, dtype=torch.float32)
        top1 = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = (hidden[s:e] @ weight.T).float() / temperature  # [c, V]
            chunk_lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[s:e, None]).squeeze(1)
            out[s:e] = target_logit - chunk_lse
            lse[s:e] = chunk_lse
            top1[s:e] = logits.argmax(dim=-1) == targets[s:e]
            if with_entropy:
                p = torch.softmax(logits, dim=-1)
                entropy[s:e] = chunk_lse - (p * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy, top1)
        return out, entropy, top1

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy, _grad_top1):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            e = min(s + ctx.chunk_size, hidden.shape[0])
            logits = (hidden[s:e] @ weight.T).float() / ctx.temperature  # [c, V]
            # d logp[target] / d logits = onehot(target) - softmax(logits), then the 1/τ of the scaling.
            g = -torch.exp(logits - lse[s:e, None]) * grad_out[s:e, None]
            g.scatter_add_(1, targets[s:e, None], grad_out[s:e, None])
            g = g / ctx.temperature
            if need_h:
                grad_h[s:e] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += g.T @ hidden[s:e].float()
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def chunked_target_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` under softmax(hidden @ weight.T / temperature), chunked over rows.

    hidden [N, d], weight [V, d] (the output head; pass `weight.detach()` to stop its gradient),
    targets [N] int64. Returns (log_prob [N] float32, entropy [N] float32 (zeros unless
    `with_entropy`), top1 [N] bool: the head's argmax equals the target).
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty + hidden.sum() * 0, empty, torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return _ChunkedTargetLogProb.apply(hidden, weight, targets, float(temperature), int(chunk_size), with_entropy)


def naive_target_log_probs(hidden, weight, targets, *, temperature: float = 1.0) -> torch.Tensor:
    """Reference: full logits, log-softmax, gather. Same contract as `chunked_target_log_probs`."""
    logits = (hidden @ weight.T).float() / temperature  # [N, V]
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
