"""The command line: one line per error for every command, `--debug` tracebacks, help without torch, `--config`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtprl.cli import COMMANDS, main
from mtprl.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
# Imports refused in the help subprocess: everything heavy a `--help` must not need.
BLOCKER = """
import sys
HEAVY = ("torch", "transformers", "accelerate", "safetensors", "math_verify", "matplotlib", "numpy")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{name} is blocked: --help must not import it")
        return None
sys.meta_path.insert(0, Block())
"""


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mtprl {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0"], "steps must be >= 1"),
    (["train", "--model", "/no/such/model"], "is not a local Hugging Face checkpoint directory"),
    (["pretrain", "--steps", "0"], "steps must be >= 1"),
    (["compare", "--regimes", "detach", "nope"], "unknown regime 'nope'"),
    (["compare", "--set", "mtp_coef=0.5"], "may not hold the settings compare sets itself: mtp_coef"),
    (["demo", "--workers", "0"], "workers must be >= 1"),
    (["report", "/no/such/run"], "does not exist"),
    (["smoke", "--mtp-layers", "0"], "mtp_layers must be >= 1"),
    (["train", "--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
])
def test_every_command_reports_bad_input_in_one_line(argv, message, capsys, monkeypatch):
    """Finding 7 / what to build: one clear line per error, no traceback, for train, pretrain, compare, demo, report."""
    monkeypatch.delenv("MTPRL_DEBUG", raising=False)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in one_error_line(captured.err, argv[0])


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.delenv("MTPRL_DEBUG", raising=False)
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        main(["train", "--steps", "0", "--debug"])
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        main(["--debug", "train", "--steps", "0"])
    monkeypatch.setenv("MTPRL_DEBUG", "1")
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        main(["train", "--steps", "0"])


@pytest.mark.parametrize("command", ["train", "pretrain", "compare", "demo", "report", "smoke", "probe"])
def test_help_imports_no_torch(command, tmp_path):
    """Finding 7: `mtprl train --help` took 10-18 s because mtprl.train imported the whole trainer."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "mtprl", command, "--help"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--config" in done.stdout and f"mtprl {command}" in done.stdout
    # The blocker is real: importing torch under it fails.
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "blocked" in blocked.stderr


def test_every_command_takes_a_config_file():
    """Finding 7: the README says every command takes --config; smoke and report did not."""
    for name, (module_name, _) in COMMANDS.items():
        module = __import__(module_name, fromlist=["add_arguments"])
        import argparse

        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert "--config" in parser._option_string_actions, name


def test_smoke_reads_its_config_file(tmp_path, capsys):
    cfg = tmp_path / "smoke.yaml"
    cfg.write_text(yaml.safe_dump({"mtp_layers": 2, "seed": 3}))
    assert main(["smoke", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "2 MTP layer(s)" in out and "MTP depth 2:" in out and "round trip identical: True" in out


def test_report_reads_its_config_file_and_writes_beside_the_runs(tmp_path, capsys):
    run = tmp_path / "runs" / "detach-seed0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"regime": "detach", "seed": 0}))
    rows = [{"kind": "train", "step": 1, "time": 1.0, "entropy": 1.0},
            {"kind": "eval", "step": 1, "time": 2.0, "eval/add-easy/greedy": 0.5, "eval/avg/greedy": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "report.yaml"
    cfg.write_text(yaml.safe_dump({"run_dirs": [str(run)]}))
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert main(["report", "--config", str(cfg)]) == 0
    finally:
        os.chdir(cwd)
    assert (tmp_path / "runs" / "report" / "report.md").is_file()  # beside the runs, not ./report
    assert not (tmp_path / "report").exists()
    assert f"report written to {tmp_path / 'runs' / 'report' / 'report.md'}" in capsys.readouterr().out


def test_acceptance_without_vllm_or_a_checkpoint_is_one_line(tmp_path, capsys):
    import importlib.util

    assert main(["acceptance"]) == 2
    assert "no checkpoint given" in capsys.readouterr().err
    assert main(["acceptance", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert ("needs vLLM" in err) if importlib.util.find_spec("vllm") is None else ("neither a model directory" in err)
