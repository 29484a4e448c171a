"""`VLLMEngine.push_weights` hands the engine one decoder layer at a time, holding no earlier chunk (no vLLM
needed: a fake engine stands in for `vllm.LLM`; the real push is tested in tests/with_vllm/)."""

import gc
import weakref

import torch

from mtprl.model import build_tiny_model, build_tokenizer
from mtprl.rollout.vllm_backend import VLLMEngine, _load_into_worker, _repack_tied_head, chunks, hf_weights, push_unit


class _FakeLLM:
    """Records each chunk's names, and how many tensors of earlier chunks were still alive when it came."""

    def __init__(self):
        self.calls, self.alive_before, self.received = [], [], []
        self.repacks = self.resets = 0

    def collective_rpc(self, method, args=()):
        if method is _repack_tied_head:
            self.repacks += 1
            return [None]
        assert method is _load_into_worker
        (chunk,) = args
        gc.collect()
        self.alive_before.append(sum(ref() is not None for ref in self.received))
        names = [n for n, _ in chunk]
        self.calls.append(names)
        self.received += [weakref.ref(t) for _, t in chunk]
        mtp = sum(".mtp_layers." in n for n in names)
        return [(len(names) - mtp, mtp)]

    def reset_prefix_cache(self):
        self.resets += 1


def _engine():
    engine = object.__new__(VLLMEngine)  # no vLLM: only the push path, around a fake LLM
    engine.llm, engine.pushes, engine._trunk_pushed = _FakeLLM(), 0, False
    return engine


def _model():
    tok = build_tokenizer()
    return build_tiny_model(tok, num_mtp_layers=2, seed=0, hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1)


def _fresh(model):
    """(name, tensor) as a sharded trainer's all-gather gives them: a new whole tensor per parameter."""
    for name, param in model.named_parameters():
        yield name, param.detach().clone()


def test_push_hands_over_one_layer_at_a_time_and_keeps_no_earlier_chunk():
    model, engine = _model(), _engine()
    everything = [n for n, _ in hf_weights(model)]
    engine.sync(model, _fresh(model))
    calls = engine.llm.calls
    assert [n for call in calls for n in call] == everything  # every weight, once, in order
    units = [{push_unit(n) for n in call} for call in calls]
    assert all(len(u) == 1 for u in units)  # one part of the model per call ...
    assert [u.pop() for u in units] == (["rest"] + [f"layers.{i}" for i in range(3)] + ["rest"]
                                        + [f"mtp_layers.{i}" for i in range(2)])  # ... each layer in one call
    assert max(len(c) for c in calls) < len(everything) / 4
    assert engine.llm.alive_before == [0] * len(calls)  # earlier chunks' tensors were all freed
    assert (engine.llm.repacks, engine.llm.resets, engine.pushes) == (1, 1, 1)  # tied head re-packed once, at the end


def test_push_counts_and_repacks_only_after_trunk_weights():
    model, engine = _model(), _engine()
    mtp = [(n, t) for n, t in hf_weights(model) if ".mtp_layers." in n]
    assert engine.push_weights(mtp) == (0, len(mtp))
    engine.finish_push()
    assert engine.llm.repacks == 0 and engine.llm.resets == 1
    trunk = [(n, t) for n, t in hf_weights(model) if ".mtp_layers." not in n]
    assert engine.push_weights(trunk[:3]) == (3, 0)
    assert engine.push_weights(trunk[3:]) == (len(trunk) - 3, 0)  # any subset, over several calls
    engine.finish_push()
    assert engine.llm.repacks == 1 and engine.pushes == 2


def test_chunks_pull_lazily():
    pulled = []

    def source():
        for name in ["model.embed_tokens.weight", "model.layers.0.a", "model.layers.0.b", "model.layers.1.a"]:
            pulled.append(name)
            yield name, torch.zeros(1)

    it = chunks(source())
    assert [n for n, _ in next(it)] == ["model.embed_tokens.weight"] and len(pulled) == 2
    assert [n for n, _ in next(it)] == ["model.layers.0.a", "model.layers.0.b"] and len(pulled) == 4
    assert [n for n, _ in next(it)] == ["model.layers.1.a"]
