"""The vLLM tests: run with the vLLM environment (`make test-vllm`, part of `make test`), skipped elsewhere.

(The folder is not called `vllm`: pytest puts tests/ on sys.path, and a `tests/vllm` folder would then
import as a namespace package `vllm`, fooling every "is vLLM installed?" check, trl's included.)

One engine per session (start-up takes seconds) serves the export of the shipped pre-trained base,
with MTP drafting of one token; the tests that change its weights restore them.
"""

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here; `make test-vllm` runs these in .venv-vllm")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """The shipped pre-trained base, exported by `MTPCausalLM.save_pretrained` (what vLLM serves)."""
    import mtprl.pretrain
    from mtprl.model import MTPCausalLM, load_tokenizer

    shipped = Path(mtprl.pretrain.__file__).parent / "base"
    out = tmp_path_factory.mktemp("vllm") / "base"
    MTPCausalLM.from_pretrained(shipped).save_pretrained(out, tokenizer=load_tokenizer(shipped))
    return out


@pytest.fixture(scope="session")
def ours(base_dir):
    from mtprl.model import MTPCausalLM, load_tokenizer

    torch.set_num_threads(1)
    return MTPCausalLM.from_pretrained(base_dir).eval(), load_tokenizer(base_dir)


@pytest.fixture(scope="session")
def engine(base_dir):
    from mtprl.rollout.vllm_backend import VLLMEngine, VLLMSettings

    return VLLMEngine(base_dir, VLLMSettings(draft_tokens=1))


@pytest.fixture(scope="session")
def suite_prompts(ours):
    from mtprl.tasks.suites import SUITES, suite_problems

    tok = ours[1]
    return [tok(p.prompt)["input_ids"] for name in SUITES for p in suite_problems(name)[:6]]
