"""The base-model cache: keys, atomic writes, reuse, and the `mtprl pretrain` command end to end."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from mtprl.cli import main
from mtprl.config import build_config
from mtprl.model import MTPCausalLM, build_tokenizer
from mtprl.pretrain import loop as pretrain_module
from mtprl.pretrain import PretrainConfig, base_model_dir, cache_key, ensure_base_model, load_summary

TINY = dict(steps=6, batch_size=8, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
            suite_size=4, progress=False, threads=1)


def make(**override):
    return build_config(PretrainConfig, {**TINY, **override})


def test_cache_key_depends_on_weight_fields_only():
    base = cache_key(make())
    assert cache_key(make()) == base
    for field, value in [("seed", 1), ("steps", 7), ("shortcut_fraction", 0.3), ("suite_seed", 3), ("lr", 1e-3)]:
        assert cache_key(make(**{field: value})) != base, field
    for field, value in [("threads", 2), ("progress", True), ("eval_batch_size", 8), ("eval_samples", 2), ("cache_dir", "/x"),
                         ("output_dir", "/y")]:
        assert cache_key(make(**{field: value})) == base, field


def test_cache_root_from_env_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPRL_CACHE", str(tmp_path / "env"))
    assert base_model_dir(make()) == tmp_path / "env" / "base" / cache_key(make())
    assert base_model_dir(make(cache_dir=str(tmp_path / "cfg"))).parent == tmp_path / "cfg" / "base"


def test_interrupted_pretraining_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def crash(cfg, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "pretrain", crash)
    cfg = make(cache_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        ensure_base_model(cfg)
    assert not base_model_dir(cfg).exists()
    assert list((tmp_path / "base").iterdir()) == []  # the temporary directory is gone too


def test_pretrain_command_writes_and_then_reuses_the_cache(tmp_path, monkeypatch, capsys):
    args = ["pretrain", "--cache-dir", str(tmp_path), "--steps", "6", "--batch-size", "8", "--hidden-size", "32",
            "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1", "--suite-size", "4", "--no-progress",
            "--threads", "1", "--eval-samples", "2", "--output-dir", str(tmp_path / "copy")]
    assert main(args) == 0
    first = capsys.readouterr().out
    directory = base_model_dir(make(cache_dir=str(tmp_path)))
    summary = load_summary(directory)
    assert set(summary["suites"]) == {"add-easy", "add-hard", "expr-easy", "expr-hard", "sort-easy", "sort-hard"}
    assert {"greedy", "pass@1", "pass@1_se"} <= set(summary["mean"]) and summary["suites"]["add-easy"]["samples"] == 2
    assert len(summary["mtp_top1_agreement"]) == 1
    assert summary["parameters"]["total"] == summary["parameters"]["shared"] + summary["parameters"]["mtp"] > 0
    assert summary["cache_key"] == directory.name and "add-hard" in first
    model = MTPCausalLM.from_pretrained(directory)
    assert model.num_mtp == 1
    # The saved char-level tokenizer encodes prompts as the in-memory one does (trailing newline included).
    # AutoTokenizer would not: for model_type qwen2, transformers 5 forces Qwen2Tokenizer's byte-level split.
    saved = PreTrainedTokenizerFast.from_pretrained(directory)
    assert saved(" 12+3=?\n")["input_ids"] == build_tokenizer()(" 12+3=?\n")["input_ids"]
    assert saved(" 12+3=?\n")["input_ids"][-1] == 3  # "\n"
    assert json.loads((tmp_path / "copy" / "summary.json").read_text()) == summary

    def must_not_train(*_args, **_kwargs):
        raise AssertionError("the cached base should have been reused")

    monkeypatch.setattr(pretrain_module, "pretrain", must_not_train)
    assert main(args) == 0
    assert "reusing the cached base" in capsys.readouterr().out
    assert ensure_base_model(make(cache_dir=str(tmp_path))) == directory


def test_implicit_pretraining_says_what_how_long_and_where(tmp_path, monkeypatch, capsys):
    def fake(cfg, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "summary.json").write_text("{}")

    monkeypatch.setattr(pretrain_module, "pretrain", fake)
    cfg = make(cache_dir=str(tmp_path), steps=2800)
    directory = ensure_base_model(cfg)
    notice = capsys.readouterr().err
    assert "pre-training the embedded base model (2800 steps" in notice
    assert "about 6 min" in notice and str(directory) in notice
    ensure_base_model(cfg)  # cached now: says nothing
    assert capsys.readouterr().err == ""


def _ship(directory, cfg):
    """A fake shipped base: a tiny model saved with the summary the real one carries."""
    from mtprl.model import build_tiny_model
    from mtprl.pretrain.cache import weights_hash

    tok = build_tokenizer()
    build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1).save_pretrained(directory,
                                                                                                   tokenizer=tok)
    (directory / "summary.json").write_text(json.dumps({"cache_key": cache_key(cfg),
                                                        "weights_hash": weights_hash(directory)}))


def test_shipped_base_is_used_for_its_config_and_its_hash_is_checked(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from mtprl.config import ConfigError
    from mtprl.pretrain import cache

    shipped = tmp_path / "shipped"
    cfg = make(cache_dir=str(tmp_path / "cache"))
    _ship(shipped, cfg)
    monkeypatch.setattr(cache, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(pretrain_module, "pretrain", lambda *a, **k: pytest.fail("the shipped base must be used"))
    assert ensure_base_model(cfg) == shipped
    # another config is not served the shipped weights
    assert cache.shipped_base(make(seed=5)) is None
    # one weight changed by a tiny amount: the hash no longer matches and the base is refused, naming both hashes
    weights = shipped / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-6
    save_file(tensors, weights, metadata={"format": "pt"})
    recorded = json.loads((shipped / "summary.json").read_text())["weights_hash"]
    with pytest.raises(ConfigError, match=f"has weights hash [0-9a-f]{{16}}, but its summary.json records {recorded}"):
        ensure_base_model(cfg)


def test_weights_hash_ignores_serialisation_but_not_values(tmp_path):
    from safetensors.torch import load_file, save_file

    from mtprl.pretrain.cache import weights_hash

    _ship(tmp_path / "a", make())
    tensors = load_file(tmp_path / "a" / "model.safetensors")
    (tmp_path / "b").mkdir()
    save_file(dict(reversed(list(tensors.items()))), tmp_path / "b" / "model.safetensors")  # other order, no metadata
    assert weights_hash(tmp_path / "a") == weights_hash(tmp_path / "b")
    name = sorted(tensors)[-1]
    tensors[name] = -tensors[name]
    save_file(tensors, tmp_path / "b" / "model.safetensors")
    assert weights_hash(tmp_path / "a") != weights_hash(tmp_path / "b")


def test_the_shipped_base_is_the_default_configs_and_intact():
    # The base in the repository must be what `mtprl pretrain` with the defaults is asked for (same cache key:
    # FORMAT_VERSION and every weight-relevant default), and its weights must still hash to its recorded value.
    from mtprl.pretrain import cache

    summary = load_summary(cache.SHIPPED_DIR)
    assert cache.shipped_base(PretrainConfig()) == cache.SHIPPED_DIR, (
        "the shipped base was trained with other settings than PretrainConfig's defaults: re-create it with "
        "`mtprl pretrain --force --output-dir mtprl/pretrain/base` or restore the defaults")
    assert cache.weights_hash(cache.SHIPPED_DIR) == summary["weights_hash"]
    assert summary["config"]["steps"] == PretrainConfig().steps
    assert set(summary["suites"]) == {"add-easy", "add-hard", "expr-easy", "expr-hard", "sort-easy", "sort-hard"}
