"""Issue 17 in the real engine: vLLM's MiMo MTP drafter reads the trunk state our MiMo layout feeds
depth 1 (before the final norm). On the shipped base the final-norm weights stay near 1, so the two
conventions look alike; here they are redrawn in [0.2, 3].

Measured once: greedy acceptance is a weak discriminator on this base. With depth 1 fed the
post-norm state (the wrong convention for MiMo) our engine still accepted 0.991 against vLLM's 0.986,
because the MTP layer's own hidden_layernorm re-normalises its input. The test that tells the
conventions apart is tests/test_model_layout.py (per-position predictions against a reference
forward, ≥ 99%, with the wrong convention failing); this one checks that vLLM computes what we do."""

import pytest
import torch

from mtprl.rollout import SamplingParams, generate
from mtprl.rollout.vllm_backend import VLLMEngine, VLLMSettings

GREEDY = SamplingParams(max_new_tokens=32, temperature=0, draft_tokens=1)


@pytest.fixture(scope="module")
def far_norm(tmp_path_factory):
    """The shipped base with its final norm redrawn in [0.2, 3], exported as vLLM serves it."""
    import mtprl.pretrain
    from pathlib import Path

    from mtprl.model import MTPCausalLM, load_tokenizer

    shipped = Path(mtprl.pretrain.__file__).parent / "base"
    model, tok = MTPCausalLM.from_pretrained(shipped).eval(), load_tokenizer(shipped)
    norm = model.base.model.norm.weight
    with torch.no_grad():
        norm.copy_(torch.rand(norm.shape, generator=torch.Generator().manual_seed(0)) * 2.8 + 0.2)
    out = tmp_path_factory.mktemp("far_norm") / "model"
    model.save_pretrained(out, tokenizer=tok)
    return out, MTPCausalLM.from_pretrained(out).eval(), tok


def _accept(rollout) -> float:
    return rollout.metrics["rollout/accept_rate/0"]


def test_far_from_one_final_norm_greedy_acceptance_equals_vllms(far_norm, suite_prompts):
    path, model, tok = far_norm
    torch.set_num_threads(1)
    engine = VLLMEngine(path, VLLMSettings(draft_tokens=1))
    theirs = engine.generate(suite_prompts, GREEDY, tok.eos_token_id)
    mine = generate(model, suite_prompts, GREEDY, eos_token_id=tok.eos_token_id)
    assert theirs.response_ids[:, :8].tolist() == mine.response_ids[:, :8].tolist()  # same main head
    assert _accept(theirs) == pytest.approx(_accept(mine), abs=0.01)
