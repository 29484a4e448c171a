"""The lean decode step (mtprl/rollout/lean.py) against `MTPCausalLM.trunk`: bit for bit, or not used.

Equality is `torch.equal` on the hidden states and on the caches they leave behind, for Qwen2,
Llama and Qwen3 trunks, GQA and MHA, pre- and post-norm layouts, left padding, masked-out cache
holes (as speculative rows leave them) and no padding at all (SDPA's unmasked path); then whole
rollouts with and without it, sampled and greedy, under the same seed.
"""

import copy
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from mtprl.model import MTPCausalLM, build_tiny_model, build_tokenizer
from mtprl.model.layout import MIMO, POST_NORM
from mtprl.rollout import SamplingParams, generate, lean
from mtprl.rollout.batch import left_pad, prefill

COMMON = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")


def family_model(family: str, kv_heads: int, post_norm: bool, seed: int = 0) -> MTPCausalLM:
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config}[family]
    extra = {"head_dim": 16, "attention_bias": True} if family == "qwen3" else {}
    config = cls(num_attention_heads=4, num_key_value_heads=kv_heads, **COMMON, **extra)
    layout = dataclasses.replace(MIMO, hidden_source=POST_NORM) if post_norm else MIMO
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MTPCausalLM(config, 1, layout=layout).eval()
        for name, p in model.named_parameters():  # norms and biases far from their init, so each one matters
            if p.dim() == 1:
                p.data.uniform_(0.5, 1.5)
    return model


def decode_both(model, prompts, steps: int, holes: bool):
    """Prefill, then `steps` one-token steps through the trunk and through the lean step, each on its
    own copy of the cache; yields (trunk states, lean states, trunk cache, lean cache) per step."""
    ids, mask = left_pad(prompts, 0, model.device)
    with torch.no_grad():
        hidden, pos, cache = prefill(model, ids, mask)
    cache_ref, cache_lean = cache, copy.deepcopy(cache)
    mask = mask.long()
    next_pos, g = pos[:, -1] + 1, torch.Generator().manual_seed(0)
    for step in range(steps):
        token = torch.randint(3, model.vocab_size, (len(prompts),), generator=g)
        new = torch.ones(len(prompts), 1, dtype=torch.long)
        if holes and step % 3 == 1:  # a rejected draft's slot: fed, then masked out, position not advanced
            new[0] = 0
        mask = torch.cat([mask, new], 1)
        with torch.no_grad():
            ref, _ = model.trunk(token[:, None], mask, next_pos[:, None], cache_ref, use_cache=True)
        got = lean.decode_step(model, token, mask, next_pos, cache_lean)
        yield ref, got, cache_ref, cache_lean
        next_pos = next_pos + new[:, 0]


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("post_norm", [False, True])
@pytest.mark.parametrize("padded", [True, False])
def test_lean_step_equals_the_trunk_bit_for_bit(family, kv_heads, post_norm, padded):
    model = family_model(family, kv_heads, post_norm)
    assert lean.supported(model)
    prompts = [[1, 5, 9, 4, 7], [1, 3, 8], [1, 6, 6, 2, 9, 11, 5]] if padded else [[1, 5, 9, 4], [1, 3, 8, 7]]
    for ref, got, cache_ref, cache_lean in decode_both(model, prompts, steps=7, holes=padded):
        assert got.shape == ref.shape and torch.equal(got, ref)
        for a, b in zip(cache_ref.layers, cache_lean.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_the_step_would_differ_if_it_skipped_a_part():
    """The comparison can fail: feeding the wrong position changes the states."""
    model = family_model("qwen2", 2, False)
    ids, mask = left_pad([[1, 5, 9], [1, 3]], 0, model.device)
    with torch.no_grad():
        _, pos, cache = prefill(model, ids, mask)
    mask = torch.cat([mask.long(), torch.ones(2, 1, dtype=torch.long)], 1)
    token = torch.tensor([4, 5])
    ref, _ = model.trunk(token[:, None], mask, pos[:, -1:] + 1, copy.deepcopy(cache), use_cache=True)
    assert not torch.equal(lean.decode_step(model, token, mask, pos[:, -1] + 2, cache), ref)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(build_tokenizer()).eval()


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_rollouts_are_identical_with_and_without_the_lean_step(tiny, monkeypatch, temperature):
    g = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(3, tiny.vocab_size, (int(n),), generator=g).tolist() for n in (4, 9, 6)]
    params = SamplingParams(max_new_tokens=40, n=4, temperature=temperature, top_p=0.9 if temperature else 1.0)
    out = {}
    for flag in (False, True):
        monkeypatch.setattr(lean, "ENABLED", flag)
        out[flag] = generate(tiny, prompts, params, eos_token_id=2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out[True].response_ids, out[False].response_ids)
    assert torch.equal(out[True].log_probs, out[False].log_probs)
    assert torch.equal(out[True].lengths, out[False].lengths)


def test_lean_step_is_used_only_where_its_equality_is_known(tiny, monkeypatch):
    assert lean.supported(tiny)
    tiny.train()
    assert not lean.supported(tiny)  # dropout would act in the trunk's forward
    tiny.eval()
    handle = tiny.base.get_decoder().layers[0].register_forward_hook(lambda *a: None)
    assert not lean.supported(tiny)  # hooks (FSDP, accelerate offload, probes) would be skipped
    handle.remove()
    monkeypatch.setattr(lean, "ENABLED", False)
    assert not lean.supported(tiny)
    eager = family_model("qwen2", 2, False)
    eager.config._attn_implementation = "eager"
    assert not lean.supported(eager)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_lean_step_equals_the_trunk_in_bfloat16(family):
    model = family_model(family, 2, False).to(torch.bfloat16)
    prompts = [[1, 5, 9, 4, 7], [1, 3, 8], [1, 6, 6, 2, 9, 11, 5]]
    for ref, got, _, _ in decode_both(model, prompts, steps=5, holes=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, ref)


def test_generate_decodes_through_the_lean_step(tiny, monkeypatch):
    calls = []
    step = lean.decode_step
    monkeypatch.setattr(lean, "decode_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    out = generate(tiny, [[1, 5, 6]], SamplingParams(max_new_tokens=6, n=2), generator=torch.Generator().manual_seed(0))
    assert len(calls) == out.metrics["rollout/verify_steps"] > 0
