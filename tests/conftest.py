"""Fixtures and markers shared by several test files.

Markers (pyproject.toml; `--strict-markers` refuses any other):
  slow  a test of many seconds (multi-process launches, long runs, the miniature experiment);
        `make test-fast` (`pytest -m "not slow"`) leaves them out, CI runs them.
  gpu   needs a CUDA device; skipped, with that reason, where torch sees none.
"""

from pathlib import Path

import pytest
import torch

from mtprl.model import build_tiny_model, build_tokenizer
from mtprl.train.config import TrainConfig


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device, and torch sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: one intra-op thread is faster, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny MTP checkpoint (hidden 32, one layer, one MTP layer) with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    tok = build_tokenizer()
    model = build_tiny_model(tok, num_mtp_layers=1, seed=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    model.save_pretrained(path, tokenizer=tok)
    return path


def small_train_config(model: Path, out: Path, **over) -> TrainConfig:
    """A `mtprl train` config of a couple of seconds per step on the tiny checkpoint.

    A random model never solves a problem, so the runs use DAPO's overlong shaping with a buffer of
    max_new_tokens − 1: the reward then falls with the response length, groups have mixed rewards,
    advantages are non-zero and the updates do something.
    """
    values = dict(model=str(model), steps=2, prompts_per_step=2, group_size=4, mini_batches=2, micro_batch_size=4,
                  max_new_tokens=12, overlong_buffer=11, max_draws=2, eval_every=0, eval_at_start=False,
                  eval_limit=2, eval_k=2, eval_suites=["add-easy"], exact_every=2, save_every=0,
                  output_dir=str(out), progress=False, lr=1e-3)
    values.update(over)
    return TrainConfig(**values)
