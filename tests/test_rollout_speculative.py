"""Speculative sampling keeps the main policy's distribution: a chi-square test on a tiny vocabulary.

A 5-token model generates 3-token responses (125 possible sequences). The exact probability of
each sequence under the main policy (after temperature / top-k / top-p) comes from one
teacher-forced forward over all 125; 6000 samples with and without MTP drafting must fit it
(p-value > 1e-3), while a deliberately wrong accept rule, resampling from p instead of the
residual max(0, p − q) after a rejection, must not (p-value < 1e-6).
"""

import itertools

import pytest
import torch
from transformers import Qwen2Config

from mtprl.model import MTPCausalLM
from mtprl.rollout import SamplingParams, generate, policy_log_probs, speculative, speculative_accept

PROMPT = [1, 2]
LENGTH, SAMPLES = 3, 6000


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def model(one_thread):
    cfg = Qwen2Config(vocab_size=5, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0)
    m = MTPCausalLM(cfg, 1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights N(0, 4 / fan_in): peaked enough that q and p differ (acceptance 0.3-0.45)
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[1] ** 0.5)
    return m.eval()


def exact_distribution(model, params: SamplingParams) -> dict[tuple, float]:
    """P(response) under the main policy for every response of LENGTH tokens."""
    seqs = torch.tensor(list(itertools.product(range(model.vocab_size), repeat=LENGTH)))  # [V^L, L]
    ids = torch.cat([torch.tensor(PROMPT).expand(len(seqs), -1), seqs], 1)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        hidden, _ = model.trunk(ids, torch.ones_like(ids), pos)
        lp = policy_log_probs(model.logits(hidden[:, len(PROMPT) - 1: -1]), params)  # [V^L, L, V]
    seq_lp = lp.gather(-1, seqs[..., None]).squeeze(-1).sum(-1)
    return {tuple(s): p for s, p in zip(seqs.tolist(), seq_lp.exp().tolist())}


def chi_square_p_value(samples: torch.Tensor, exact: dict[tuple, float]) -> float:
    """Goodness of fit of samples [N, L] to `exact`; cells expected < 5 pooled into one."""
    counts = dict.fromkeys(exact, 0)
    for row in samples.tolist():
        counts[tuple(row)] += 1
    n = samples.shape[0]
    big = [k for k in exact if exact[k] * n >= 5]
    observed = [counts[k] for k in big] + [n - sum(counts[k] for k in big)]
    expected = [exact[k] * n for k in big] + [n - sum(exact[k] * n for k in big)]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
    dof = len(observed) - 1
    # chi-square survival function: Q(dof / 2, stat / 2), the regularised upper incomplete gamma
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def sample(model, params: SamplingParams, seed: int) -> torch.Tensor:
    out = generate(model, [PROMPT], params, generator=torch.Generator().manual_seed(seed))
    assert out.lengths.tolist() == [LENGTH] * SAMPLES
    return out.response_ids, out.metrics


def resample_from_p(target_log_probs, draft_log_probs, drafts, generator, rows=None):
    """A classic bug: after a rejection draw from p instead of the residual max(0, p − q)."""
    n_acc, _ = speculative_accept(target_log_probs, draft_log_probs, drafts, generator)
    p_next = target_log_probs[torch.arange(drafts.shape[0]), n_acc].exp()
    return n_acc, torch.multinomial(p_next, 1, generator=generator).squeeze(-1)


SETTINGS = [dict(temperature=1.0), dict(temperature=0.8, top_k=4, top_p=0.9)]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("draft_tokens", [0, 1, 2])
def test_sequences_follow_the_main_policy(model, settings, draft_tokens):
    params = SamplingParams(max_new_tokens=LENGTH, n=SAMPLES, draft_tokens=draft_tokens, **settings)
    ids, metrics = sample(model, params, seed=draft_tokens)
    assert chi_square_p_value(ids, exact_distribution(model, params)) > 1e-3
    if draft_tokens:  # the test only has power if drafts are both accepted and rejected often
        assert 0.2 < metrics["rollout/accept_rate"] < 0.8


def test_a_wrong_accept_rule_fails_the_same_test(model, monkeypatch):
    monkeypatch.setattr(speculative, "speculative_accept", resample_from_p)
    params = SamplingParams(max_new_tokens=LENGTH, n=SAMPLES, draft_tokens=2)
    ids, _ = sample(model, params, seed=0)
    assert chi_square_p_value(ids, exact_distribution(model, params)) < 1e-6
