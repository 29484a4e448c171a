"""TrainConfig: bad values fail fast with a message naming the field, before any model is built; --help."""

import dataclasses

import pytest

from mtprl import cli
from mtprl.config import ConfigError
from mtprl.train import TrainConfig, train
from mtprl.train import command as train_command
from mtprl.train import loop


@pytest.fixture(autouse=True)
def no_model_building(monkeypatch):
    """Any attempt to build a model or start a run fails the test: errors must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the config was rejected")

    monkeypatch.setattr(loop, "load_model", forbidden)
    monkeypatch.setattr(loop, "_accelerator", forbidden)


BAD_VALUES = [
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"prompts_per_step": 3, "group_size": 2, "mini_batches": 4}, "mini_batches (4) must divide the rollout batch"),
    ({"lr": -1e-5}, "lr must be >= 0"),
    ({"regime": "occ-fancy"}, "regime must be one of frozen, detach, detach-mtp-only, ce, policy, occ, occ-exact "
                              "(the registered regimes); got 'occ-fancy'"),
    ({"data": "/nonexistent/math.jsonl"}, "data file '/nonexistent/math.jsonl' does not exist"),
    ({"model": "/nonexistent/ckpt"}, "model '/nonexistent/ckpt' is not a local Hugging Face checkpoint"),
    ({"families": ["add", "poetry"]}, "unknown task family 'poetry'"),
    ({"occ_clip": [1.0]}, "occ_clip must be empty or two numbers"),
    ({"overlong_buffer": 96}, "overlong_buffer (96) must be smaller than max_new_tokens (96)"),
    ({"steps": "ten"}, "config field 'steps' must be int"),
    ({"temperature": 0}, "temperature must be > 0"),
    ({"resume": "/nonexistent/step-00000001"}, "resume must be 'none', 'auto' or an existing checkpoint"),
]


@pytest.mark.parametrize("values, message", BAD_VALUES)
def test_bad_values_are_rejected_by_train_before_any_model(values, message):
    cfg = dataclasses.replace(TrainConfig(), **values)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert message in str(err.value)


def _cli_error(capsys, argv: list[str]) -> str:
    """What `mtprl train ARGV` prints on stderr; it must fail with status 2 (argparse's errors exit with it)."""
    try:
        code = cli.main(["train", *argv])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--group-size", "1"], "group_size must be >= 2"),
    (["--mini-batches", "3"], "mini_batches (3) must divide the rollout batch prompts_per_step × group_size = 16"),
    (["--lr", "-0.1"], "lr must be >= 0"),
    (["--regime", "sideways"], "regime must be one of frozen, detach, detach-mtp-only, ce, policy, occ, occ-exact"),
    (["--data", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
    (["--steps", "1.5"], "config field 'steps' must be int"),
])
def test_bad_command_lines_fail_with_their_message(capsys, argv, message):
    assert message in _cli_error(capsys, argv)


def test_unknown_and_mistyped_yaml_keys(capsys, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("regime: occ\ngroup_sise: 4\n")
    assert "unknown config key 'group_sise'" in _cli_error(capsys, ["--config", str(config)])
    assert "did you mean 'group_size'?" in _cli_error(capsys, ["--config", str(config)])
    config.write_text("regime: occ\nmini_batches: [4]\n")
    assert "config field 'mini_batches' must be int" in _cli_error(capsys, ["--config", str(config)])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in text, field.name
    flat = " ".join(text.split())  # argparse wraps lines wherever the terminal width puts them
    assert "λ₀" in flat and "[default: 'occ']" in flat


def test_bare_resume_means_auto_and_yaml_loses_to_the_command_line(tmp_path):
    import argparse

    from mtprl.config import load_config

    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    config = tmp_path / "train.yaml"
    config.write_text("regime: policy\nsteps: 7\n")
    args = parser.parse_args(["--config", str(config), "--resume", "--steps", "9"])
    cfg = load_config(TrainConfig, args)
    assert (cfg.resume, cfg.regime, cfg.steps) == ("auto", "policy", 9)
    assert parser.parse_args([]).resume is None  # absent: the config's value ("none" by default) stands


def test_the_torch_free_names_match_the_losses():
    """train/config.py names the built-in regimes and the dual-clip default without importing mtprl.losses."""
    from mtprl.losses import DUAL_CLIP, MTP_REGIMES
    from mtprl.train.config import BUILT_IN_REGIMES, DEFAULT_DUAL_CLIP

    assert BUILT_IN_REGIMES == tuple(MTP_REGIMES)  # tests that register a regime remove it again
    assert DEFAULT_DUAL_CLIP == DUAL_CLIP == TrainConfig().dual_clip
