"""`rollout_rng: prompt`: a prompt's responses do not depend on the other prompts of the batch or on how the
prompts are split over workers; `batch` (the default) draws exactly as before (tests/test_train_golden.py pins
whole runs of it).

The tiny random model samples with a set of stop tokens, so rows finish at different steps and the engine
drops finished rows from its batch at different moments depending on what else the batch holds: the case
where a generator shared by a batch would hand a prompt other numbers.
"""

import json

import pytest
import torch

from mtprl.config import ConfigError
from mtprl.model import build_tiny_model, build_tokenizer
from mtprl.rollout import PromptGenerators, SamplingParams, generate
from mtprl.train.batch import derive_seed
from mtprl.train.config import TrainConfig
from mtprl.train.distributed import Dist
from mtprl.train.rollouts import generate_shared

SEED = 1234


@pytest.fixture(scope="module")
def setup(one_thread):
    tok = build_tokenizer()
    model = build_tiny_model(tok, num_mtp_layers=1, seed=3, hidden_size=32, num_layers=2, num_heads=2,
                             num_kv_heads=1).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.vocab_size
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in (3, 7, 2, 5, 4)]
    return model, tok, prompts


def _worker(world: int, rank: int) -> Dist:
    dist = Dist()
    dist.world, dist.rank = world, rank
    return dist


def _params(model, draft_tokens: int) -> SamplingParams:
    stops = tuple(range(3, model.vocab_size, 9))  # ~1 token in 9: rows end after a few tokens, at different steps
    return SamplingParams(max_new_tokens=10, temperature=1.0, n=3, stop_token_ids=stops, draft_tokens=draft_tokens)


def _per_prompt(rollout, first: int = 0) -> dict[int, list[tuple[list[int], torch.Tensor]]]:
    """{global prompt index: [(response tokens, their log-probs) per sample]}."""
    out: dict[int, list] = {}
    for row, i in enumerate(rollout.prompt_index.tolist()):
        n = int(rollout.lengths[row])
        out.setdefault(first + i, []).append((rollout.response_ids[row, :n].tolist(), rollout.log_probs[row, :n]))
    return out


def _shared(model, tok, prompts, params, world: int, rng: str) -> dict[int, list]:
    out = {}
    for rank in range(world):
        rollout, _, share = generate_shared(model, tok, prompts, params, SEED, _worker(world, rank), rng=rng)
        out.update(_per_prompt(rollout, share.start))
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for i in a:
        assert [t for t, _ in a[i]] == [t for t, _ in b[i]], i
        for (_, la), (_, lb) in zip(a[i], b[i]):
            assert torch.allclose(la, lb, atol=1e-5, rtol=0), i


@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_prompt_rng_gives_a_prompt_the_same_responses_alone_batched_and_split(setup, draft_tokens):
    model, tok, prompts = setup
    params = _params(model, draft_tokens)
    whole = _shared(model, tok, prompts, params, 1, "prompt")
    _same(_shared(model, tok, prompts, params, 2, "prompt"), whole)  # shares 3 + 2 prompts
    _same(_shared(model, tok, prompts, params, 3, "prompt"), whole)  # 2 + 2 + 1
    for i, prompt in enumerate(prompts):  # alone, seeded as the i-th prompt of the call
        alone = generate(model, [prompt], params, eos_token_id=tok.eos_token_id,
                         generator=PromptGenerators([derive_seed(SEED, "prompt", i)], 3))
        _same(_per_prompt(alone, i), {i: whole[i]})
    lengths = [len(t) for i in whole for t, _ in whole[i]]
    assert len(set(lengths)) > 2  # rows finished at different steps (the engine compacted its batch meanwhile)
    assert any(len({tuple(t) for t, _ in whole[i]}) > 1 for i in whole)  # a group's rows draw their own numbers
    # The per-worker generators of `batch` draw other responses when the prompts are split otherwise.
    split = _shared(model, tok, prompts, params, 2, "batch")
    assert [t for i in sorted(split) for t, _ in split[i]] != [t for i in sorted(whole) for t, _ in whole[i]]


@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_batch_rng_draws_from_one_generator_per_worker_as_before(setup, draft_tokens):
    """`batch` = the engine on a plain generator seeded by (seed, rank), as the trainer did before prompt existed."""
    model, tok, prompts = setup
    params = _params(model, draft_tokens)
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        dist = _worker(world, rank)
        rollout, _, share = generate_shared(model, tok, prompts, params, SEED, dist)
        old = generate(model, prompts[share], params, eos_token_id=tok.eos_token_id,
                       generator=torch.Generator().manual_seed(derive_seed(SEED, rank)))
        assert torch.equal(rollout.response_ids, old.response_ids) and torch.equal(rollout.log_probs, old.log_probs)


def test_prompt_generators_rows_and_checks(setup):
    model, _, prompts = setup
    gens = PromptGenerators([11, 12], n=3)
    rows = torch.tensor([5, 0, 4])  # prompt 1 sample 2, prompt 0 sample 0, prompt 1 sample 1
    u = gens.rand(rows, (2,), torch.float64)
    first = torch.rand((3, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    second = torch.rand((3, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    assert torch.equal(u, torch.stack([second[2], first[0], second[1]]))
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(model, prompts, SamplingParams(n=3, max_new_tokens=2), generator=PromptGenerators([1, 2], 3))
    with pytest.raises(ValueError, match="samples per prompt"):
        PromptGenerators([1], 0)


def test_rollout_rng_option():
    TrainConfig(rollout_rng="prompt").validate()
    with pytest.raises(ConfigError, match="rollout_rng"):
        from mtprl.config import build_config

        build_config(TrainConfig, {"rollout_rng": "row"}, "test")
    with pytest.raises(ConfigError, match="use rollout_rng: batch with rollout_backend vllm"):
        TrainConfig(rollout_rng="prompt", rollout_backend="vllm").validate()


def test_batch_run_refuses_to_resume_on_another_process_count(tmp_path, tiny_checkpoint):
    """A `batch` run's checkpoint of 2 processes resumed on 1 is refused, naming the fix; `prompt` is not refused."""
    from conftest import small_train_config
    from mtprl.train import train
    from mtprl.train.checkpoint import resume_world_problem, write_manifest

    for rng in ("batch", "prompt"):
        out = tmp_path / rng
        train(small_train_config(tiny_checkpoint, out, exact_every=0, save_every=1, rollout_rng=rng))
        ckpt = out / "checkpoints" / "step-00000001"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["config"]["rollout_rng"] == rng and state["world_size"] == 1
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))  # as if 2 wrote it
        (ckpt / "rng-rank1.json").write_text((ckpt / "rng-rank0.json").read_text())
        write_manifest(ckpt)
        resume = small_train_config(tiny_checkpoint, out, exact_every=0, save_every=1, rollout_rng=rng,
                                    resume=str(ckpt))
        if rng == "batch":
            with pytest.raises(ConfigError, match="start the run with rollout_rng: prompt"):
                train(resume)
        else:
            assert resume_world_problem(ckpt, 1, rng) is None
            train(resume)
    assert resume_world_problem(ckpt, 2, "batch") is None  # the same process count: no problem
