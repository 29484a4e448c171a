"""Sampling maths of the rollout engine: parameters, filters, greedy and speculative accept rules."""

import math

import pytest
import torch

from mtprl.rollout import SamplingParams, filtered_log_probs, greedy_accept, speculative_accept
from mtprl.rollout.sampling import sample_categorical

LOGITS = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # softmax = [0.1, 0.2, 0.3, 0.4]


@pytest.mark.parametrize("kwargs, expected", [
    # no filter: softmax of log([1, 2, 3, 4]) = [1, 2, 3, 4] / 10
    (dict(temperature=1.0), [0.1, 0.2, 0.3, 0.4]),
    # T = 2: softmax(log(x) / 2) ∝ sqrt(x) = [1, 1.414, 1.732, 2] / 6.146
    (dict(temperature=2.0), [1 / 6.1463, 1.41421 / 6.1463, 1.73205 / 6.1463, 2 / 6.1463]),
    # top-k = 2 keeps 0.3 and 0.4 -> renormalised [3/7, 4/7]
    (dict(temperature=1.0, top_k=2), [0, 0, 3 / 7, 4 / 7]),
    # top-k >= V is a no-op
    (dict(temperature=1.0, top_k=9), [0.1, 0.2, 0.3, 0.4]),
    # top-p = 0.5: descending 0.4, 0.3, 0.2, 0.1 have mass before 0, 0.4, 0.7, 0.9; keep mass-before < 0.5
    (dict(temperature=1.0, top_p=0.5), [0, 0, 3 / 7, 4 / 7]),
    # top-p = 0.35: 0.3 has 0.4 before it, which already reaches 0.35 -> only the top token
    (dict(temperature=1.0, top_p=0.35), [0, 0, 0, 1]),
    # top-p = 0.75: mass before 0.2 is 0.7 < 0.75 -> keep 0.4, 0.3, 0.2 -> [2, 3, 4] / 9
    (dict(temperature=1.0, top_p=0.75), [0, 2 / 9, 3 / 9, 4 / 9]),
    # top-k = 3 then top-p = 0.5 on the renormalised [2, 3, 4] / 9: mass before 0, 4/9 (< 0.5), 7/9 -> [3, 4] / 7
    (dict(temperature=1.0, top_k=3, top_p=0.5), [0, 0, 3 / 7, 4 / 7]),
])
def test_filtered_log_probs_hand_computed(kwargs, expected):
    probs = filtered_log_probs(LOGITS[None], **kwargs).exp()[0]
    assert torch.allclose(probs, torch.tensor(expected, dtype=torch.float32), atol=1e-4)


def test_top_k_keeps_ties_like_transformers():
    # logits [1, 1, 0]: the 1st-largest value is 1 and both tokens holding it stay -> [0.5, 0.5, 0]
    probs = filtered_log_probs(torch.tensor([[1.0, 1.0, 0.0]]), 1.0, top_k=1).exp()[0]
    assert torch.allclose(probs, torch.tensor([0.5, 0.5, 0.0]))


def test_filtered_log_probs_batched_rows_independent():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])  # [2, V]
    probs = filtered_log_probs(logits, 1.0, top_k=1).exp()
    assert torch.equal(probs, torch.tensor([[0.0, 0, 0, 1], [1.0, 0, 0, 0]]))


def test_sample_categorical_frequencies_and_zero_mass():
    # unnormalised weights [2, 0, 6, 0, 2] -> probabilities [0.2, 0, 0.6, 0, 0.2]; 100k draws
    # per row, sd of a frequency <= 0.0016; zero-weight tokens never come out.
    weights = torch.tensor([[2.0, 0, 6, 0, 2], [0.0, 0, 0, 0, 1]]).repeat_interleave(100_000, 0)
    draws = sample_categorical(weights, torch.Generator().manual_seed(0)).view(2, -1)
    freq = torch.stack([torch.bincount(d, minlength=5) for d in draws]).float() / 100_000
    assert torch.allclose(freq[0], torch.tensor([0.2, 0, 0.6, 0, 0.2]), atol=0.008)
    assert freq[0, 1] == 0 and freq[0, 3] == 0 and freq[1, 4] == 1


def test_sample_categorical_is_reproducible_with_a_generator():
    probs = torch.softmax(torch.randn(64, 10, generator=torch.Generator().manual_seed(1)), -1)
    a = sample_categorical(probs, torch.Generator().manual_seed(7))
    b = sample_categorical(probs, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (64,) and a.dtype == torch.long


def test_greedy_accept_counts_leading_matches():
    # main argmax per verified position: row 0 -> [2, 0, 1], row 1 -> [1, 1, 1]
    target = torch.log_softmax(torch.tensor([
        [[0.0, 0, 5], [5.0, 0, 0], [0.0, 5, 0]],
        [[0.0, 5, 0], [0.0, 5, 0], [0.0, 5, 0]],
    ]), -1)
    drafts = torch.tensor([[2, 0], [0, 1]])
    n_acc, nxt = greedy_accept(target, drafts)
    # row 0: both drafts match -> 2 accepted, bonus = argmax at position 2 = 1
    # row 1: first draft 0 != 1 -> 0 accepted, correction = argmax at position 0 = 1 (the later match is ignored)
    assert n_acc.tolist() == [2, 0]
    assert nxt.tolist() == [1, 1]


def _accept_many(p_rows, q_rows, draft_token=None, rows=200_000, seed=0):
    """Run speculative_accept on `rows` copies with drafts sampled from q (D = len(q_rows))."""
    g = torch.Generator().manual_seed(seed)
    target = torch.tensor(p_rows).log()[None].expand(rows, -1, -1)  # [rows, D+1, V]
    draft_lp = torch.tensor(q_rows).log()[None].expand(rows, -1, -1)  # [rows, D, V]
    drafts = torch.multinomial(draft_lp[0].exp(), rows, replacement=True, generator=g).T  # [rows, D]
    if draft_token is not None:
        drafts = torch.full_like(drafts, draft_token)
    return drafts, *speculative_accept(target, draft_lp, drafts, g)


def _first_token(drafts, n_acc, nxt):
    """The first emitted token: the first draft if accepted, else the replacement."""
    return torch.where(n_acc > 0, drafts[:, 0], nxt)


def test_speculative_accept_emits_main_distribution():
    # p = [0.5, 0.3, 0.2], q = [0.2, 0.2, 0.6]: accept prob = Σ min(p, q) = 0.2 + 0.2 + 0.2 = 0.6;
    # residual max(0, p - q) = [0.3, 0.1, 0] / 0.4 = [0.75, 0.25, 0];
    # emitted = [0.2, 0.2, 0.2] (accepted) + 0.4 * [0.75, 0.25, 0] = [0.5, 0.3, 0.2] = p.
    p, q = [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]
    drafts, n_acc, nxt = _accept_many([p, [1 / 3] * 3], [q])
    assert abs(n_acc.float().mean().item() - 0.6) < 0.005  # sd of the mean ~ 0.0011
    freq = torch.bincount(_first_token(drafts, n_acc, nxt), minlength=3).float() / drafts.shape[0]
    assert torch.allclose(freq, torch.tensor(p), atol=0.005)
    # after a rejection the token comes from the residual only: never token 2, 0 w.p. 0.75
    rejected = nxt[n_acc == 0]
    assert int((rejected == 2).sum()) == 0
    assert abs((rejected == 0).float().mean().item() - 0.75) < 0.01


def test_speculative_accept_bonus_token_from_last_position():
    # q equals p at position 0, so every draft is accepted (u·q < p for u < 1) and the bonus
    # token is drawn from p_1 = [0.1, 0.9].
    p0, p1 = [0.7, 0.3], [0.1, 0.9]
    drafts, n_acc, nxt = _accept_many([p0, p1], [p0], rows=100_000)
    assert bool((n_acc == 1).all())
    assert abs((nxt == 1).float().mean().item() - 0.9) < 0.005


def test_speculative_accept_rejects_tokens_the_main_policy_never_emits():
    # draft token 2 has p = 0 -> always rejected; the residual max(0, p - q) = p on tokens 0, 1.
    p, q = [0.25, 0.75, 0.0], [0.0, 0.0, 1.0]
    drafts, n_acc, nxt = _accept_many([p, [1 / 3] * 3], [q], draft_token=2, rows=50_000)
    assert int(n_acc.sum()) == 0
    assert abs((nxt == 1).float().mean().item() - 0.75) < 0.01


def test_speculative_accept_counts_only_leading_acceptances():
    # D = 2: depth 0 always rejects (p = 0 on the draft), depth 1 would always accept (p = q);
    # n_accepted must stay 0 because acceptance stops at the first rejection.
    p = [[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.5, 0.5, 0.0]]
    q = [[0.0, 0.0, 1.0], [0.2, 0.8, 0.0]]
    target = torch.tensor(p).log()[None].expand(1000, -1, -1)
    draft_lp = torch.tensor(q).log()[None].expand(1000, -1, -1)
    drafts = torch.tensor([[2, 1]]).expand(1000, -1)
    n_acc, _ = speculative_accept(target, draft_lp, drafts, torch.Generator().manual_seed(0))
    assert int(n_acc.max()) == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n must be an integer >= 1"),
    (dict(top_p=0.0), "top_p must lie in"),
    (dict(top_p=1.5), "top_p must lie in"),
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(draft_tokens=-1), "draft_tokens must be an integer >= 0"),
    (dict(stop_token_ids=(-3,)), "stop_token_ids must be non-negative"),
])
def test_sampling_params_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_stop_ids_and_greedy_flag():
    params = SamplingParams(stop_token_ids=[5, 7], temperature=0)
    assert params.stop_token_ids == (5, 7)
    assert params.greedy and not SamplingParams().greedy
