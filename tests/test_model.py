"""MTPCausalLM: alignment, chunked log-probs, detach switches, checkpoints, bad input."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from mtprl.model import (
    MTPCausalLM,
    build_tiny_model,
    build_tokenizer,
    chunked_target_log_probs,
    load_tokenizer,
    naive_target_log_probs,
    tiny_config,
)

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture()
def model(tok):
    m = build_tiny_model(tok, num_mtp_layers=2, seed=1, **SMALL)
    return m.eval()


def _ids(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_tokenizer_round_trip_and_specials(tok, tmp_path):
    ids = tok("a+1\n")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 5
    assert tok.decode(ids, skip_special_tokens=True) == "a+1\n"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    # Saved with a qwen2 model: AutoTokenizer would swap in Qwen2's class and re-split the text.
    build_tiny_model(tok, **SMALL).save_pretrained(tmp_path, tokenizer=tok)
    again = load_tokenizer(tmp_path)
    text = "sort 3 1\n 12 + 4"
    assert again(text)["input_ids"] == tok(text)["input_ids"] and len(again(text)["input_ids"]) == len(text) + 1
    assert again.padding_side == "left" and again.pad_token_id == 0


def test_aligned_log_probs_match_hand_built_heads(model, tok):
    """Depth k's entry at t equals log-softmax of that head's output at source t-k-1, taken at x_t.

    Built by hand in MiMo's layout: depth 1 reads the trunk state before the final norm and the
    next token's embedding (zeros at position 0), concat [hidden, token]; depth 2 reads depth 1's
    state after its final_layernorm.
    """
    ids, _ = _ids(tok, ["12+34=46"])
    L = ids.shape[1]
    out = model.token_log_probs(ids)
    with torch.no_grad():
        inner = model.base.get_decoder()
        emb = model.base.get_input_embeddings()
        pos_all = torch.arange(L)[None]
        h = emb(ids)
        for layer in inner.layers:  # the trunk without its final norm
            h = layer(h, position_ids=pos_all, position_embeddings=inner.rotary_emb(h, pos_all))
        main = torch.log_softmax(model.base(input_ids=ids).logits.float(), -1)  # [1, L, V]
        prev, expected = h, []
        for k, layer in enumerate(model.mtp_layers):
            n = L - k - 1  # source positions 0..n-1 have a next token x_{i+k+1}
            pos = torch.arange(n)[None]
            e = emb(ids[:, k + 1 : k + 1 + n])
            e[:, 0] = 0.0  # position 0's token is not an input
            x = torch.cat([layer.hidden_layernorm(prev[:, :n]), layer.token_layernorm(e)], -1)
            x = layer.input_proj(x)
            block_out = layer.block(x, position_ids=pos, position_embeddings=inner.rotary_emb(x, pos))
            prev = layer.final_layernorm(block_out)
            expected.append(torch.log_softmax(model.base.lm_head(prev).float(), -1))
    for t in range(L):
        if t >= 1:
            assert out.mask[0, t]
            torch.testing.assert_close(out.log_probs[0, t], main[0, t - 1, ids[0, t]], atol=1e-5, rtol=0)
        else:
            assert not out.mask[0, t] and out.log_probs[0, t] == 0
        for k in range(2):
            if t >= k + 2:
                assert out.mtp_mask[k, 0, t]
                torch.testing.assert_close(out.mtp_log_probs[k, 0, t], expected[k][0, t - k - 2, ids[0, t]],
                                           atol=1e-5, rtol=0)
                assert out.mtp_top1[k, 0, t] == (expected[k][0, t - k - 2].argmax() == ids[0, t])
            else:
                assert not out.mtp_mask[k, 0, t]


def test_left_padding_does_not_change_log_probs(model, tok):
    ids, mask = _ids(tok, ["7*8=56", "1+1=2 and more"])
    alone_ids, _ = _ids(tok, ["7*8=56"])
    padded = model.token_log_probs(ids, mask)
    alone = model.token_log_probs(alone_ids)
    n = alone_ids.shape[1]
    torch.testing.assert_close(padded.log_probs[0, -n:], alone.log_probs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.mtp_log_probs[:, 0, -n:], alone.mtp_log_probs[:, 0], atol=1e-5, rtol=0)
    assert padded.mask[0, : -n + 1].sum() == 0  # pads and the first real token are never scored
    assert padded.mtp_mask[1, 0].sum() == n - 3  # depth 2 skips the first 3 tokens


def test_chunked_equals_naive_values_and_gradients():
    torch.manual_seed(0)
    h = torch.randn(13, 8, dtype=torch.float32, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float32, requires_grad=True)
    y = torch.randint(0, 50, (13,))
    coeff = torch.randn(13)
    lp, ent, top1 = chunked_target_log_probs(h, w, y, temperature=0.7, chunk_size=4, with_entropy=True)
    (lp * coeff).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = naive_target_log_probs(h, w, y, temperature=0.7)
    (ref * coeff).sum().backward()
    assert (lp - ref).abs().max() <= 1e-5
    assert (gh - h.grad).abs().max() <= 1e-5 and (gw - w.grad).abs().max() <= 1e-5
    logits = (h @ w.T / 0.7).detach()
    p = torch.softmax(logits, -1)
    assert (ent - (-(p * torch.log_softmax(logits, -1)).sum(-1))).abs().max() <= 1e-5
    assert torch.equal(top1, logits.argmax(-1) == y)


def test_token_log_probs_chunk_size_does_not_matter(model, tok):
    ids, mask = _ids(tok, ["3-1=2", "9+9=18!"])
    a = model.token_log_probs(ids, mask, chunk_size=3, with_entropy=True)
    b = model.token_log_probs(ids, mask, chunk_size=4096, with_entropy=True)
    assert (a.log_probs - b.log_probs).abs().max() <= 1e-5
    assert (a.mtp_log_probs - b.mtp_log_probs).abs().max() <= 1e-5
    assert (a.entropy - b.entropy).abs().max() <= 1e-5


def _mtp_loss(model, tok):
    ids, mask = _ids(tok, ["12+3=15", "4*4=16"])
    out = model.token_log_probs(ids, mask)
    return -(out.mtp_log_probs * out.mtp_mask).sum()


def test_detach_switches_stop_all_gradient_into_shared_params(model, tok):
    model.set_detach(hidden=True, embedding=True, head=True)
    _mtp_loss(model, tok).backward()
    for p in model.shared_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtp_layers[0].parameters())


@pytest.mark.parametrize("switch", ["hidden", "embedding", "head"])
def test_each_switch_on_its_own(model, tok, switch):
    """With one switch on, its own path is cut and the others still carry gradient."""
    model.set_detach(**{switch: True})
    _mtp_loss(model, tok).backward()
    trunk_grad = model.base.model.layers[0].mlp.up_proj.weight.grad
    emb_grad = model.base.get_input_embeddings().weight.grad  # tied with the head
    if switch == "hidden":
        assert trunk_grad is None or torch.count_nonzero(trunk_grad) == 0
        assert emb_grad.abs().sum() > 0
    else:
        assert trunk_grad.abs().sum() > 0


def test_no_detach_gives_trunk_gradient(model, tok):
    _mtp_loss(model, tok).backward()
    assert model.base.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_parameter_groups_partition_the_model(model):
    shared = {id(p) for p in model.shared_parameters()}
    mtp = {id(p) for p in model.mtp_parameters()}
    assert not shared & mtp
    assert shared | mtp == {id(p) for p in model.parameters()}


def test_save_load_bit_identical_and_plain_causal_lm(model, tok, tmp_path):
    model.save_pretrained(tmp_path, tokenizer=tok)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 2
    again = MTPCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = _ids(tok, ["5+5=10", "2*3=6"])
    a, b = model.token_log_probs(ids, mask), again.token_log_probs(ids, mask)
    assert torch.equal(a.log_probs, b.log_probs) and torch.equal(a.mtp_log_probs, b.mtp_log_probs)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits,
                           model.base(input_ids=ids, attention_mask=mask).logits)


def test_mimo_named_checkpoint_loads_its_mtp_weights(tok, tmp_path):
    base = AutoModelForCausalLM.from_config(tiny_config(tok, **SMALL))
    base.config.num_nextn_predict_layers = 1
    base.save_pretrained(tmp_path)
    probe = MTPCausalLM(base, 1)  # only to learn the shapes of a MiMo MTP layer
    torch.manual_seed(3)
    mimo = {}
    for key, value in probe.mtp_layers[0].state_dict().items():
        mimo["model.mtp_layers.0." + key.removeprefix("block.")] = torch.randn_like(value)
    save_file(mimo, tmp_path / "model-00002-of-00002.safetensors")
    loaded = MTPCausalLM.from_pretrained(tmp_path)
    state = loaded.mtp_layers[0].state_dict()
    assert torch.equal(state["block.self_attn.q_proj.weight"], mimo["model.mtp_layers.0.self_attn.q_proj.weight"])
    assert torch.equal(state["input_proj.weight"], mimo["model.mtp_layers.0.input_proj.weight"])
    assert torch.equal(state["token_layernorm.weight"], mimo["model.mtp_layers.0.token_layernorm.weight"])


def test_checkpoint_without_mtp_gets_fresh_layers_and_logs(tok, tmp_path, caplog):
    base = AutoModelForCausalLM.from_config(tiny_config(tok, **SMALL))
    base.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mtprl.model.checkpoint"):
        model = MTPCausalLM.from_pretrained(tmp_path, num_mtp_layers=2)
    assert model.num_mtp == 2 and "initialised fresh" in caplog.text
    last = base.model.layers[-1].state_dict()
    assert torch.equal(model.mtp_layers[1].block.state_dict()["mlp.up_proj.weight"], last["mlp.up_proj.weight"])


def test_bad_inputs_have_clear_errors(model, tok, tmp_path):
    with pytest.raises(ValueError, match="num_mtp_layers must be an integer >= 1"):
        MTPCausalLM(tiny_config(tok, **SMALL), 0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MTPCausalLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weight files"):
        MTPCausalLM.from_pretrained(tmp_path / "empty")
    ids, mask = _ids(tok, ["1+1=2"])
    with pytest.raises(ValueError, match="token ids must lie in"):
        model.token_log_probs(ids + 1000)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.token_log_probs(ids, mask[:, :-1])


def test_mismatched_mtp_shapes_are_rejected(tok, tmp_path):
    base = AutoModelForCausalLM.from_config(tiny_config(tok, **SMALL))
    base.save_pretrained(tmp_path)
    save_file({"model.mtp_layers.0.input_proj.weight": torch.zeros(32, 48)}, tmp_path / "mtp.safetensors")
    with pytest.raises(ValueError, match=r"has shape \(32, 48\) but the base model needs \(32, 64\)"):
        MTPCausalLM.from_pretrained(tmp_path)
