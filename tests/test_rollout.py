"""The rollout engine on tiny models: greedy and speculative agreement, log-probs, padding, EOS, bad input."""

import pytest
import torch

from mtprl.model import build_tiny_model, build_tokenizer
from mtprl.rollout import SamplingParams, generate, speculative
from mtprl.rollout.batch import DecodeState

TOK = build_tokenizer()
PROMPTS = [TOK.encode("hello world"), TOK.encode("ab"), TOK.encode("12+7="), TOK.encode("x"), [TOK.bos_token_id]]


def reinit(model, std: float, seed: int = 0):
    """Re-draw every weight matrix as N(0, std² / fan_in): random models with peaked, varied outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std / p.shape[1] ** 0.5)
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def model(one_thread):
    # std 2: greedy responses wander over many tokens instead of repeating one (as at default init)
    return reinit(build_tiny_model(TOK, hidden_size=64, num_layers=2), 2.0)


def teacher_forced(model, out):
    """Main-head log-probs of the responses from a fresh forward of concat(prompt, response)."""
    ids = torch.cat([out.prompt_ids, out.response_ids], 1)
    mask = torch.cat([out.prompt_mask, out.response_mask], 1)
    with torch.no_grad():
        lp = model.token_log_probs(ids, mask, mtp=False).log_probs
    return lp[:, out.prompt_ids.shape[1]:] * out.response_mask


def oracle_drafts(monkeypatch, reference, prompt_lengths, corrupt: float, seed: int = 0, check=None):
    """Replace the MTP drafts by the reference continuation, each token corrupted w.p. `corrupt`.

    The real drafter still runs first (its MTP cache bookkeeping is what is under test);
    `check(model, state)` is called on every step.
    """
    real = speculative.draft
    g = torch.Generator().manual_seed(seed)

    def fake(model, state, params, generator):
        drafts, q = real(model, state, params, generator)
        if check is not None:
            check(model, state)
        done = state.next_pos - prompt_lengths[state.rows] + 1  # [B] tokens committed so far
        idx = (done[:, None] + torch.arange(drafts.shape[1])).clamp(max=reference.shape[1] - 1)
        oracle = reference[state.rows[:, None], idx]
        wrong = torch.rand(drafts.shape, generator=g) < corrupt
        return torch.where(wrong, (oracle + 1) % model.vocab_size, oracle), q

    monkeypatch.setattr(speculative, "draft", fake)


# ----- greedy: speculative == plain ----------------------------------------------------------
@pytest.mark.parametrize("draft_tokens", [1, 2, 4])
def test_greedy_speculative_equals_greedy(model, monkeypatch, draft_tokens):
    repacks, repack = [], DecodeState.repack
    monkeypatch.setattr(DecodeState, "repack", lambda self: repacks.append(self.mask.shape[1]) or repack(self))
    ref = generate(model, PROMPTS, SamplingParams(max_new_tokens=24, temperature=0))
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=24, temperature=0, draft_tokens=draft_tokens))
    assert torch.equal(out.response_ids, ref.response_ids)
    assert torch.allclose(out.log_probs, ref.log_probs, atol=1e-5)
    if draft_tokens == 4:  # drafts are mostly rejected: 5 slots per step fill the caches with holes
        assert repacks and min(repacks) >= 64


@pytest.mark.parametrize("draft_tokens, corrupt", [(1, 0.3), (3, 0.3), (5, 0.15)])
def test_greedy_speculative_equals_greedy_with_accepted_drafts(model, monkeypatch, draft_tokens, corrupt):
    # A random MTP layer almost never agrees with the main head under greedy, so drafts come
    # from the reference continuation with some tokens corrupted: every acceptance length occurs.
    ref = generate(model, PROMPTS, SamplingParams(max_new_tokens=30, temperature=0))
    lengths = torch.tensor([len(p) for p in PROMPTS])
    oracle_drafts(monkeypatch, ref.response_ids, lengths, corrupt)
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=30, temperature=0, draft_tokens=draft_tokens))
    assert torch.equal(out.response_ids, ref.response_ids)
    assert torch.allclose(out.log_probs, ref.log_probs, atol=1e-5)
    assert 0.3 < out.metrics["rollout/accept_rate"] < 1.0  # both acceptances and rejections happened


def test_uncorrupted_oracle_drafts_accept_everything(model, monkeypatch):
    # 30 tokens: the first comes from the prefill, then each verify step commits D + 1 = 4
    # tokens: 29 = 7 * 4 + 1 -> 8 verify steps, every draft accepted (the reference runs longer,
    # so drafts past the 30th token are right too).
    ref = generate(model, PROMPTS, SamplingParams(max_new_tokens=40, temperature=0))
    oracle_drafts(monkeypatch, ref.response_ids, torch.tensor([len(p) for p in PROMPTS]), corrupt=0.0)
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=30, temperature=0, draft_tokens=3))
    assert torch.equal(out.response_ids, ref.response_ids[:, :30])
    m = out.metrics
    assert m["rollout/verify_steps"] == 8.0
    assert [m[f"rollout/accept_rate/{d}"] for d in range(3)] == [1.0, 1.0, 1.0]
    assert m["rollout/mean_accepted"] == 3.0 and m["rollout/accept_rate"] == 1.0


def test_mtp_cache_matches_a_fresh_forward_after_rejections(model, monkeypatch):
    # On every step the drafter's starting state (depth-1 MTP state at source T-2) must equal the
    # one a fresh full forward over the committed tokens gives, however many drafts were rejected.
    ref = generate(model, PROMPTS[:2], SamplingParams(max_new_tokens=20, temperature=0))
    lengths = torch.tensor([len(p) for p in PROMPTS[:2]])
    diffs = []

    def check(model, state):
        for b, row in enumerate(state.rows.tolist()):
            done = int(state.next_pos[b] - lengths[row] + 1)
            ids = torch.tensor([PROMPTS[row] + ref.response_ids[row, :done].tolist()])  # [1, T]
            mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
            h, _ = model.trunk(ids, mask, pos)
            s = model.mtp_hidden(0, h[:, :-1], ids[:, 1:], mask[:, :-1], pos[:, :-1])  # [1, T-1, d]
            diffs.append((s[0, -1] - state.draft_hidden[b]).abs().max().item())

    oracle_drafts(monkeypatch, ref.response_ids, lengths, corrupt=0.4, check=check)
    out = generate(model, PROMPTS[:2], SamplingParams(max_new_tokens=20, temperature=0, draft_tokens=3))
    assert torch.equal(out.response_ids, ref.response_ids)
    assert len(diffs) >= 10 and max(diffs) < 1e-4


def test_two_mtp_layers_draft_with_the_first():
    m2 = reinit(build_tiny_model(TOK, num_mtp_layers=2, hidden_size=64, num_layers=2), 2.0)
    ref = generate(m2, PROMPTS, SamplingParams(max_new_tokens=16, temperature=0))
    out = generate(m2, PROMPTS, SamplingParams(max_new_tokens=16, temperature=0, draft_tokens=3))
    assert torch.equal(out.response_ids, ref.response_ids)


# ----- log-probs, padding, EOS ----------------------------------------------------------------
@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_log_probs_equal_teacher_forced_forward(model, draft_tokens):
    params = SamplingParams(max_new_tokens=24, temperature=1.0, n=3, draft_tokens=draft_tokens)
    out = generate(model, PROMPTS, params, eos_token_id=TOK.eos_token_id, generator=torch.Generator().manual_seed(1))
    assert (teacher_forced(model, out) - out.log_probs).abs().max().item() <= 1e-4
    assert bool((out.log_probs[out.response_mask] < 0).all())


def test_log_probs_are_those_of_the_filtered_distribution(model):
    # With top-k = 1 the sampled distribution is a point mass: every log-prob is log 1 = 0.
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, top_k=1, n=2),
                   generator=torch.Generator().manual_seed(0))
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0))
    assert torch.equal(out.log_probs, torch.zeros_like(out.log_probs))
    assert torch.equal(out.response_ids[::2], greedy.response_ids)


@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_left_padding_does_not_change_a_prompts_output(model, draft_tokens):
    params = SamplingParams(max_new_tokens=20, temperature=0, draft_tokens=draft_tokens)
    batch = generate(model, PROMPTS, params)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], params)
        assert torch.equal(batch.response_ids[i], alone.response_ids[0])
        assert torch.allclose(batch.log_probs[i], alone.log_probs[0], atol=1e-5)
        assert batch.prompt_mask[i].sum() == len(prompt)


@pytest.mark.parametrize("draft_tokens, use_stop_ids", [(0, False), (2, False), (0, True), (3, True)])
def test_eos_and_stop_tokens_end_a_response(model, draft_tokens, use_stop_ids):
    ref = generate(model, PROMPTS, SamplingParams(max_new_tokens=24, temperature=0))
    stop = int(ref.response_ids[0, 5])  # a token greedy emits in row 0 (and maybe elsewhere)
    params = SamplingParams(max_new_tokens=24, temperature=0, draft_tokens=draft_tokens,
                            stop_token_ids=(stop,) if use_stop_ids else ())
    out = generate(model, PROMPTS, params, eos_token_id=None if use_stop_ids else stop)
    for i in range(len(PROMPTS)):
        hits = (ref.response_ids[i] == stop).nonzero()
        expect = int(hits[0]) + 1 if len(hits) else 24  # truncated after the first stop, stop included
        assert out.lengths[i] == expect
        assert out.finish_reasons[i] == ("stop" if len(hits) else "length")
        assert torch.equal(out.response_ids[i, :expect], ref.response_ids[i, :expect])
        assert bool((out.response_ids[i, expect:] == TOK.pad_token_id).all())
        assert bool((out.log_probs[i, expect:] == 0).all())
    assert torch.equal(out.response_mask, torch.arange(out.response_ids.shape[1]) < out.lengths[:, None])
    assert out.response_ids.shape[1] == int(out.lengths.max())


def test_sampled_rows_stop_at_eos_and_finished_rows_leave_the_batch(model, monkeypatch):
    # eos = a frequent token under sampling: most rows stop early, so the batch is compacted.
    sizes, select = [], DecodeState.select
    monkeypatch.setattr(DecodeState, "select", lambda self, keep: sizes.append(len(keep)) or select(self, keep))
    params = SamplingParams(max_new_tokens=40, temperature=1.0, n=8, draft_tokens=2)
    eos = TOK.encode(" ", add_special_tokens=False)[0]  # the space's token (stored as 'Ġ', byte-level)
    out = generate(model, PROMPTS, params, eos_token_id=eos, generator=torch.Generator().manual_seed(0))
    stopped = [r == "stop" for r in out.finish_reasons]
    assert 0 < sum(stopped) < len(stopped)
    for i, s in enumerate(stopped):
        resp = out.response_ids[i, : out.lengths[i]]
        assert int((resp == eos).sum()) == (1 if s else 0)  # no EOS before the end
        assert (resp[-1] == eos) == s and (s or out.lengths[i] == 40)
    assert (teacher_forced(model, out) - out.log_probs).abs().max().item() <= 1e-4
    # the batch of 40 rows shrank at least twice, each time to at most 3/4 of its size
    assert len(sizes) >= 2 and sizes[0] <= 30 and all(b <= 0.75 * a for a, b in zip(sizes, sizes[1:]))


# ----- contract ---------------------------------------------------------------------------------
def test_generate_runs_in_eval_mode_and_restores_the_mode(model):
    model.train()
    try:
        train_mode = generate(model, PROMPTS, SamplingParams(max_new_tokens=6, temperature=0))
        assert model.training
    finally:
        model.eval()
    assert torch.equal(train_mode.response_ids, generate(model, PROMPTS, SamplingParams(max_new_tokens=6,
                                                                                      temperature=0)).response_ids)


def test_rollout_layout_and_reproducibility(model):
    params = SamplingParams(max_new_tokens=10, n=3, draft_tokens=2)
    a = generate(model, PROMPTS[:2], params, generator=torch.Generator().manual_seed(5))
    b = generate(model, PROMPTS[:2], params, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.log_probs, b.log_probs)
    assert a.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert a.prompt_ids.shape == (6, len(PROMPTS[0])) and a.prompt_mask.dtype == torch.bool
    assert torch.equal(a.prompt_ids[3, -3:], torch.tensor(PROMPTS[1]))
    assert a.response_ids.is_contiguous() and a.log_probs.is_contiguous()
    assert a.prompt_ids[3, 0] == TOK.pad_token_id and not a.prompt_mask[3, 0]
    assert a.response_mask.dtype == torch.bool and a.log_probs.dtype == torch.float32
    assert a.finish_reasons == ["length"] * 6 and a.lengths.tolist() == [10] * 6
    keys = {"rollout/tokens_per_s", "rollout/mean_accepted", "rollout/accept_rate", "rollout/verify_steps",
            "rollout/accept_rate/0", "rollout/accept_rate/1"}
    assert set(a.metrics) == keys
    m = a.metrics
    assert m["rollout/mean_accepted"] == pytest.approx(m["rollout/accept_rate/0"] + m["rollout/accept_rate/1"])
    assert m["rollout/accept_rate"] == pytest.approx(m["rollout/mean_accepted"] / 2)
    plain = generate(model, PROMPTS[:2], SamplingParams(max_new_tokens=10, n=3)).metrics
    # 10 tokens without drafting: one from the prefill, then 9 single-token forwards
    assert plain["rollout/verify_steps"] == 9.0 and plain["rollout/mean_accepted"] == 0.0
    assert "rollout/accept_rate/0" not in plain and plain["rollout/tokens_per_s"] > 0


@pytest.mark.parametrize("prompts, params, kwargs, message", [
    ([[]], SamplingParams(), {}, "prompt 0 is empty"),
    ([], SamplingParams(), {}, "non-empty list"),
    ([[1] * 500], SamplingParams(max_new_tokens=64), {}, "context is 512"),
    ([[1] * 600], SamplingParams(max_new_tokens=1), {}, "shorten the prompt"),
    ([[1, 999]], SamplingParams(), {}, "outside \\[0, 99\\)"),
    ([[1, 2]], SamplingParams(), {"eos_token_id": 500}, "eos_token_id must be token ids"),
    ([[1, 2]], SamplingParams(stop_token_ids=(100,)), {}, "stop_token_ids must be token ids"),
    ([[1, 2]], SamplingParams(), {"generator": 3}, "generator must be a torch.Generator"),
    ([[1, 2]], {"n": 2}, {}, "params must be a SamplingParams"),
    (["hello"], SamplingParams(), {}, "list of int token ids"),
])
def test_bad_requests_raise_clear_errors(model, prompts, params, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        generate(model, prompts, params, **kwargs)
