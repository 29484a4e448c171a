"""MTP layouts per family: a MiMo checkpoint computes what MiMo's reference MTP forward computes.

The reference below is written from vLLM 0.32's `MiMoMultiTokenPredictorLayer` and `MiMoModel`
(see mtprl/model/layout.py): depth 1 reads the trunk's last state *before* its final norm and
the embedding of the next token (zeros at position 0); out = final_layernorm(block(input_proj(
concat[hidden_layernorm(h), token_layernorm(e)]))); logits = out @ lm_head. The synthetic
checkpoint's norm weights are drawn in [0.2, 3] so that a wrong convention shows.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from mtprl.model import MTPCausalLM, build_tiny_model, build_tokenizer
from mtprl.model.layout import DEEPSEEK, LEGACY_MTPRL, MIMO, MTPLayout, layout_of

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
V, D, LENGTH = 61, 64, 40


def _qwen2_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def mimo_dir(tmp_path_factory):
    """A MiMo-7B-shaped checkpoint in miniature: model_type mimo, MiMo's key names, norms in [0.2, 3]."""
    path = tmp_path_factory.mktemp("mimo")
    g = torch.Generator().manual_seed(0)
    base = AutoModelForCausalLM.from_config(_qwen2_config())
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 2.8 + 0.2 if "norm" in name
                    else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    base.save_pretrained(path)
    probe = Qwen2DecoderLayer(_qwen2_config(), 0).state_dict()
    mtp = {f"model.mtp_layers.0.{k}": torch.randn(v.shape, generator=g) / v.shape[-1] ** 0.5 for k, v in probe.items()}
    mtp["model.mtp_layers.0.input_proj.weight"] = torch.randn(D, 2 * D, generator=g) / (2 * D) ** 0.5
    for norm in ("hidden_layernorm", "token_layernorm", "final_layernorm", "input_layernorm",
                 "post_attention_layernorm"):
        mtp[f"model.mtp_layers.0.{norm}.weight"] = torch.rand(D, generator=g) * 2.8 + 0.2
    save_file(mtp, path / "model-mtp.safetensors")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="mimo", architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1,
                  auto_map={"AutoConfig": "configuration_mimo.MiMoConfig",
                            "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@torch.no_grad()
def mimo_reference_predictions(path, ids):
    """Depth-1 greedy predictions [B, L-1] at source positions 0..L-2, MiMo's forward written out."""
    w = {**load_file(path / "model.safetensors"), **load_file(path / "model-mtp.safetensors")}
    config = _qwen2_config()
    config._attn_implementation = "eager"  # plain softmax attention under the explicit causal mask below
    trunk = Qwen2DecoderLayer(config, 0)  # stands in for each trunk layer in turn
    rope = AutoModelForCausalLM.from_config(config).model.rotary_emb
    B, L = ids.shape
    pos = torch.arange(L)[None].expand(B, L)
    causal = torch.full((L, L), float("-inf")).triu(1)[None, None]  # [1, 1, L, L] additive
    h = w["model.embed_tokens.weight"][ids]
    for i in range(2):
        trunk.load_state_dict({k[len(f"model.layers.{i}."):]: v for k, v in w.items()
                               if k.startswith(f"model.layers.{i}.")})
        h = trunk(h, attention_mask=causal, position_ids=pos, position_embeddings=rope(h, pos))
    # h: the last layer's output, before model.norm (vLLM's MiMoModel returns hidden + residual)
    src, nxt, p = h[:, :-1], ids[:, 1:], pos[:, :-1]
    e = w["model.embed_tokens.weight"][nxt]
    e = torch.where((p == 0)[..., None], torch.zeros_like(e), e)  # masking inputs at position 0
    m = "model.mtp_layers.0."
    x = torch.cat([_rms(src, w[m + "hidden_layernorm.weight"]), _rms(e, w[m + "token_layernorm.weight"])], -1)
    x = x @ w[m + "input_proj.weight"].T
    block = Qwen2DecoderLayer(config, 0)
    block.load_state_dict({k[len(m):]: v for k, v in w.items() if k.startswith(m) and "." in k[len(m):]
                           and k[len(m):].split(".")[0] in {"self_attn", "mlp", "input_layernorm",
                                                            "post_attention_layernorm"}})
    x = block(x, attention_mask=causal[..., :-1, :-1], position_ids=p, position_embeddings=rope(x, p))
    logits = _rms(x, w[m + "final_layernorm.weight"]) @ w["lm_head.weight"].T
    return logits.argmax(-1)


@torch.no_grad()
def our_predictions(model, ids):
    B, L = ids.shape
    mask = torch.ones_like(ids)
    pos = model.position_ids(mask.bool())
    states, _ = model.trunk(ids, mask, pos)
    h1 = model.mtp_hidden(0, states[:, :-1], ids[:, 1:], mask[:, :-1], pos[:, :-1])
    return model.mtp_logits(0, h1).argmax(-1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (6, LENGTH), generator=torch.Generator().manual_seed(1))


def test_mimo_checkpoint_matches_the_reference_forward(mimo_dir, ids):
    model = MTPCausalLM.from_pretrained(mimo_dir).eval()
    assert model.layout == MIMO
    agree = (our_predictions(model, ids) == mimo_reference_predictions(mimo_dir, ids)).float().mean()
    assert agree >= 0.99


@pytest.mark.parametrize("wrong", [dict(hidden_source="post_norm"), dict(concat_order="token_hidden"),
                                   dict(zero_first_token=False)])
def test_a_wrong_convention_fails_the_same_comparison(mimo_dir, ids, wrong):
    right = MTPCausalLM.from_pretrained(mimo_dir).eval()
    layout = MTPLayout(**{**MIMO.to_dict(), **wrong})
    model = MTPCausalLM(right.base, 1, layout=layout).eval()
    model.mtp_layers.load_state_dict(right.mtp_layers.state_dict())
    agree = (our_predictions(model, ids) == mimo_reference_predictions(mimo_dir, ids)).float().mean()
    assert agree < 0.99  # measured: 0.35, 0.03 and 0.85


def test_position_zero_token_is_not_an_input(mimo_dir):
    """Under MiMo's layout the depth-1 output at position 0 does not depend on the token beside it."""
    model = MTPCausalLM.from_pretrained(mimo_dir).eval()
    a = torch.tensor([[5, 7, 9, 11]])
    b = torch.tensor([[5, 8, 9, 11]])  # differs only in x_1, the token read at source 0
    with torch.no_grad():
        outs = []
        for x in (a, b):
            mask = torch.ones_like(x)
            pos = model.position_ids(mask.bool())
            states, _ = model.trunk(x, mask, pos)
            outs.append(model.mtp_hidden(0, states[:, :1], x[:, 1:2], mask[:, :1], pos[:, :1]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_main_head_is_unchanged_by_the_layout(mimo_dir, ids):
    """Pre-norm trunk states still give the main head exactly the plain causal LM's logits."""
    model = MTPCausalLM.from_pretrained(mimo_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(mimo_dir, config=_qwen2_config()).eval()
    with torch.no_grad():
        mask = torch.ones_like(ids)
        states, _ = model.trunk(ids, mask, model.position_ids(mask.bool()))
        torch.testing.assert_close(model.logits(states), plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        lp = model.token_log_probs(ids).log_probs[:, 1:]
        ref = torch.log_softmax(plain(input_ids=ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)


def test_layout_round_trips_through_save_and_load(tmp_path):
    tok = build_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2)
    assert model.layout == MIMO
    odd = MTPLayout(hidden_source="post_norm", chain_source="pre_norm", concat_order="token_hidden",
                    zero_first_token=False)
    model = MTPCausalLM(model.base, 1, layout=odd)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mtp_layout"] == odd.to_dict()
    assert MTPCausalLM.from_pretrained(tmp_path).layout == odd


def test_old_mtprl_export_keeps_its_convention(tmp_path):
    """MiMo-named MTP weights on a qwen2 trunk without `mtp_layout`: mtprl 0.1's post-norm convention."""
    tok = build_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["mtp_layout"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert MTPCausalLM.from_pretrained(tmp_path).layout == LEGACY_MTPRL


def test_families_map_to_their_reference_conventions():
    assert layout_of(Qwen2Config()) == MIMO  # fresh layers on a base without MTP
    deepseek = layout_of(type("C", (), {"model_type": "deepseek_v3", "num_nextn_predict_layers": 1})())
    assert deepseek == DEEPSEEK and deepseek.hidden_source == "post_norm" and deepseek.concat_order == "token_hidden"
    with pytest.raises(ValueError, match="in a layout mtprl does not map"):
        layout_of(type("C", (), {"model_type": "ernie4_5_moe", "num_nextn_predict_layers": 1})())
    with pytest.raises(ValueError, match="mtp_layout.hidden_source = 'middle'"):
        MTPLayout.from_dict({"hidden_source": "middle"})
    with pytest.raises(ValueError, match="unknown keys"):
        MTPLayout.from_dict({"norm": "pre"})
