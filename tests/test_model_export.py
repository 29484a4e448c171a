"""Exports that other tools read: AutoTokenizer gives our ids, MTP/head tensors survive byte for byte,
config.json names the vLLM architecture that drafts with the MTP layers (or the reason there is none)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from mtprl.model import MTPCausalLM, build_tiny_model, build_tokenizer, load_tokenizer
from mtprl.model.checkpoint import mtp_state_dict, vllm_mtp_architecture
from mtprl.model.layout import LEGACY_MTPRL
from mtprl.model.tokenizer import CHARACTERS, export_tokenizer, is_legacy_tokenizer

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
TEXTS = ["4738-5957=?\n", "  a b\n\n", " \n \n  x  ", "it's we'll 12 345\n#### 7", CHARACTERS, CHARACTERS[::-1]]


def _expected_ids(text):
    """Our ids by hand: <bos>, then '\\n' = 3 and chr(c) = c - 28 for printable c (tokenizer docstring)."""
    return [1] + [3 if ch == "\n" else ord(ch) - 28 for ch in text]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tok = build_tokenizer()
    model = build_tiny_model(tok, num_mtp_layers=2, seed=3, **SMALL).eval()
    with torch.no_grad():  # every MTP and head tensor far from its initial value, so a fresh one would differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("export") / "model"
    model.save_pretrained(path, tokenizer=tok)
    return model, path


@pytest.mark.parametrize("text", TEXTS)
def test_autotokenizer_on_an_export_gives_our_ids(exported, text):
    _, path = exported
    auto = AutoTokenizer.from_pretrained(path)
    ours = build_tokenizer()
    assert auto(text)["input_ids"] == ours(text)["input_ids"] == _expected_ids(text)
    assert auto.decode(auto(text)["input_ids"], skip_special_tokens=True) == text
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (0, 1, 2) and len(auto) == 99


def test_every_vocabulary_character_is_one_token(exported):
    auto = AutoTokenizer.from_pretrained(exported[1])
    for ch in CHARACTERS:
        assert auto(ch, add_special_tokens=False)["input_ids"] == _expected_ids(ch)[1:], repr(ch)


def test_legacy_wordlevel_tokenizer_is_exported_in_byte_level_form(tmp_path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{ch: 3 + i for i, ch in enumerate(CHARACTERS)}}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    legacy = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    assert is_legacy_tokenizer(legacy) and not is_legacy_tokenizer(build_tokenizer())
    assert export_tokenizer(legacy).get_vocab() != legacy.get_vocab()  # converted
    build_tiny_model(build_tokenizer(), **SMALL).save_pretrained(tmp_path, tokenizer=legacy)
    assert AutoTokenizer.from_pretrained(tmp_path)(TEXTS[0])["input_ids"] == _expected_ids(TEXTS[0])
    assert load_tokenizer(tmp_path)(TEXTS[1])["input_ids"] == _expected_ids(TEXTS[1])


def test_round_trip_keeps_every_mtp_and_head_tensor_bytes(exported):
    model, path = exported
    with safe_open(path / "model.safetensors", framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    wanted = mtp_state_dict(model)
    wanted["model.embed_tokens.weight"] = model.base.get_input_embeddings().weight.detach()
    assert set(wanted) <= set(stored)
    assert len([k for k in stored if k.startswith("model.mtp_layers.")]) == len(model.mtp_layers.state_dict())
    for name, tensor in wanted.items():
        assert stored[name].dtype == tensor.dtype and stored[name].shape == tensor.shape
        assert stored[name].numpy().tobytes() == tensor.numpy().tobytes(), name
    again = MTPCausalLM.from_pretrained(path)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and t1.numpy().tobytes() == t2.numpy().tobytes(), n1
    head = again.base.get_output_embeddings().weight
    assert head.detach().numpy().tobytes() == model.base.get_output_embeddings().weight.detach().numpy().tobytes()


def test_export_names_mimo_for_vllm_and_still_loads_in_automodel(exported):
    model, path = exported
    fields = json.loads((path / "config.json").read_text())
    assert fields["architectures"] == ["MiMoForCausalLM"] and fields["model_type"] == "qwen2"
    assert fields["num_nextn_predict_layers"] == 2
    auto = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([_expected_ids(TEXTS[0])])
    assert torch.allclose(auto(ids).logits, model(ids).logits, atol=1e-5)
    assert model.config.architectures == ["Qwen2ForCausalLM"]  # the live model's config is left as it was


def test_unservable_pairings_are_named():
    llama = MTPCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))
    arch, why = vllm_mtp_architecture(llama.config, llama.layout)
    assert arch is None and "llama" in why and "MiMoForCausalLM" in why
    arch, why = vllm_mtp_architecture(build_tiny_model(build_tokenizer(), **SMALL).config, LEGACY_MTPRL)
    assert arch is None and "0.1" in why
