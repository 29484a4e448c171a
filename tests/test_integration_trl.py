"""TRL adapter: MTPGRPOTrainer on the tiny default (CPU), its loss against TRL's, and task rewards as TRL rewards.

Runs two real optimiser steps per regime through TRL's own training loop (generation, rewards,
advantages, `steps_per_generation`), and checks the loss of one batch against plain `GRPOTrainer`.
"""

import copy

import pytest
import torch

pytest.importorskip("trl", reason="the TRL adapter needs the trl extra: pip install 'mtprl[trl]'")
from trl import GRPOConfig, GRPOTrainer

from mtprl.integrations.trl import MTPGRPOTrainer, task_dataset, task_reward_function, trl_aggregation
from mtprl.losses import MTP_REGIMES, mtp_metric_keys, policy_loss
from mtprl.model import MTPCausalLM, apply_regime, build_tiny_model, build_tokenizer
from mtprl.tasks import Problem, get_task


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def config(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        learning_rate=1e-3, max_steps=2, bf16=False, gradient_checkpointing=False, report_to=[], logging_steps=1,
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )
    return GRPOConfig(**{**base, **overrides})


def distinct_chars(prompts, completions, **kwargs):
    """A reward that varies between random completions, so advantages (and hence updates) are non-zero."""
    return [float(len(set(c))) for c in completions]


@pytest.mark.parametrize("regime", ["detach", "occ"])
def test_two_optimiser_steps_log_lambda_where_it_should_be(tmp_path, tokenizer, regime):
    model = build_tiny_model(tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = task_dataset(get_task("add").generate(0, 4, 1))
    # steps_per_generation=2 > gradient_accumulation_steps=1: one rollout batch, two optimiser steps.
    args = config(tmp_path, steps_per_generation=2)
    trainer = MTPGRPOTrainer(model, reward_funcs=distinct_chars, args=args, train_dataset=data,
                             processing_class=tokenizer, mtp_regime=regime, mtp_coef=0.1)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "mtp/0/lambda" in h]
    assert [h["step"] for h in steps] == [1, 2]
    lam = [h["mtp/0/lambda"] for h in steps]
    if regime == "detach":
        assert lam == pytest.approx([0.1, 0.1])  # fixed λ₀ / K, K = 1
        assert model.detach.hidden and model.detach.embedding and not model.detach.head  # the authors' baseline
    else:
        # Step 1 runs at θ = θ_old, so δ ≡ 0 and λ = 0; step 2 follows one update of the same rollout.
        assert lam[0] == 0.0
        assert abs(lam[1]) > 1e-3 and steps[1]["mtp/0/c_hat"] == pytest.approx(lam[1] / 0.1, rel=1e-5)
    assert trainer.state.global_step == 2
    mtp_moved = any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n.startswith("mtp_layers"))
    assert mtp_moved, "the MTP layers were not trained"


def flags(model: MTPCausalLM) -> tuple:
    return (model.detach.hidden, model.detach.embedding, model.detach.head,
            tuple(p.requires_grad for p in model.parameters()))


@pytest.mark.parametrize("regime", list(MTP_REGIMES))
def test_the_adapter_sets_up_the_model_as_the_trainer_does(tmp_path, tokenizer, regime):
    """Same detach switches and requires_grad flags as `mtprl train` (`apply_regime`), from a model set up
    for another regime first, and metrics with the keys of every other regime."""
    data = task_dataset(get_task("add").generate(0, 4, 1))
    ours = build_tiny_model(tokenizer)
    other = "frozen" if MTP_REGIMES[regime].trains_mtp else "ce"
    apply_regime(ours, other)
    trainer = MTPGRPOTrainer(ours, reward_funcs=distinct_chars, args=config(tmp_path, steps_per_generation=2),
                             train_dataset=data, processing_class=tokenizer, mtp_regime=regime)
    theirs = build_tiny_model(tokenizer)
    apply_regime(theirs, regime)
    assert flags(trainer.model) == flags(theirs)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what TRL's training loop sets
    trainer._compute_loss(trainer.model, fixed_batch(tokenizer, trainer.model))
    assert mtp_metric_keys(1) <= trainer._metrics["train"].keys()


def fixed_batch(tokenizer, model):
    """A GRPO micro-batch: 4 equal-length prompts, ragged completions, old log-probs off the current ones."""
    prompts = ["12+34=\n", "56+78=\n", "90+12=\n", "34+56=\n"]
    prompt_ids = torch.tensor([tokenizer.encode(p, add_special_tokens=False) for p in prompts])
    g = torch.Generator().manual_seed(0)
    completion_ids = torch.randint(3, len(tokenizer), (4, 6), generator=g)
    completion_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 6, [1] * 2 + [0] * 4])
    ids = torch.cat([prompt_ids, completion_ids], 1)
    with torch.no_grad():
        current = model.token_log_probs(ids, torch.ones_like(ids)).log_probs[:, -6:]
    return {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.25, -1.0]),
        "old_per_token_logps": current + 0.3 * torch.randn(4, 6, generator=g),  # ratios in and out of the clip range
        "num_items_in_batch": completion_mask.sum(),
    }


@pytest.fixture(scope="module")
def trainers(tmp_path_factory, tokenizer):
    """(ours with the MTP term off, plain TRL on a copy of the same base model), in training mode."""
    model = build_tiny_model(tokenizer)
    args = config(tmp_path_factory.mktemp("plain"), gradient_accumulation_steps=2, steps_per_generation=4)
    data = task_dataset(get_task("add").generate(0, 4, 1))
    ours = MTPGRPOTrainer(model, reward_funcs=distinct_chars, args=args, train_dataset=data,
                          processing_class=tokenizer, mtp_regime="frozen")
    plain = GRPOTrainer(copy.deepcopy(model.base), reward_funcs=distinct_chars, args=args, train_dataset=data,
                        processing_class=tokenizer)
    for trainer in (ours, plain):
        trainer.current_gradient_accumulation_steps = 2  # what TRL's training loop sets
    return ours, plain


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_mtp_term_off_gives_plain_grpo_trainers_loss(trainers, tokenizer, loss_type):
    ours, plain = trainers
    ours.loss_type = plain.loss_type = loss_type
    inputs = fixed_batch(tokenizer, ours.model)
    expected = plain._compute_loss(plain.model, inputs)
    got = ours._compute_loss(ours.model, inputs)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert all(not p.requires_grad for p in ours.model.mtp_parameters())  # frozen: φ fixed


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_trl_aggregation_reduces_like_trl(trainers, tokenizer, loss_type):
    """mtprl's surrogate reduced with `trl_aggregation` equals TRL's own loss: the MTP term is reduced alike."""
    _, plain = trainers
    plain.loss_type = loss_type
    model = trainers[0].model
    inputs = fixed_batch(tokenizer, model)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    log_prob = model.token_log_probs(ids, torch.ones_like(ids)).log_probs[:, -6:]
    options, scale = trl_aggregation(
        loss_type, inputs["completion_mask"], training=True, grad_accum=2, steps_per_generation=4,
        num_items_in_batch=inputs["num_items_in_batch"], num_processes=1, max_completion_length=8,
    )
    ours, _ = policy_loss(log_prob, inputs["old_per_token_logps"], inputs["advantages"], inputs["completion_mask"],
                          clip_low=plain.epsilon_low, clip_high=plain.epsilon_high, **options)
    assert (scale * ours).item() == pytest.approx(plain._compute_loss(plain.model, inputs).item(), rel=1e-5)


def test_trl_aggregation_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    common = dict(grad_accum=2, steps_per_generation=4, num_items_in_batch=torch.tensor(24.0), num_processes=2,
                  max_completion_length=8)
    assert trl_aggregation("grpo", mask, training=True, **common) == ({"agg": "seq-mean-token-mean", "global_seqs": 2}, 0.5)
    options, scale = trl_aggregation("dapo", mask, training=True, **common)
    # 24 tokens in the generation batch / 2 processes = 12 per process, × grad_accum 2 / steps_per_generation 4 = 6
    assert options["global_tokens"].item() == 6.0 and scale == 1.0
    options, scale = trl_aggregation("dapo", mask, training=False, **common)
    assert options["global_tokens"].item() == 12.0  # in eval the batch is neither split nor accumulated
    with pytest.raises(ValueError, match="unknown TRL loss_type"):
        trl_aggregation("ppo", mask, training=True, **common)


def test_task_reward_is_a_trl_reward_function():
    task = get_task("add")
    problems = [Problem("3+4=\n", "7", "", "add", 1), Problem("1+1=\n", "2", "", "add", 1)]
    data = task_dataset(problems)
    assert data.column_names == ["prompt", "answer", "family", "difficulty", "meta"]
    reward = task_reward_function(task)
    assert reward.__name__ == "add_reward"  # TRL logs rewards/<name>/mean
    # TRL's call: prompts, completions, completion_ids and every other dataset column as keyword lists.
    got = reward(prompts=data["prompt"], completions=["3+4=7\n#### 7", "#### 3"], completion_ids=[[], []],
                 answer=data["answer"], family=data["family"], difficulty=data["difficulty"], meta=data["meta"],
                 trainer_state=None, log_extra=None, log_metric=None)
    assert got == [1.0, 0.0]
    with pytest.raises(ValueError, match="'answer' column"):
        reward(prompts=["x"], completions=["#### 1"])


def test_checkpoint_round_trip_and_bad_inputs(tmp_path, tokenizer, trainers):
    ours, _ = trainers
    ours.save_model(str(tmp_path))
    loaded = MTPCausalLM.from_pretrained(tmp_path)
    for (name, a), b in zip(ours.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match="MTPCausalLM"):
        MTPGRPOTrainer(copy.deepcopy(ours.model.base), reward_funcs=distinct_chars, args=ours.args)
    with pytest.raises(ValueError, match="unknown MTP regime"):
        MTPGRPOTrainer(build_tiny_model(tokenizer), reward_funcs=distinct_chars, args=ours.args, mtp_regime="joint")


def test_occ_warns_when_every_step_sees_the_rollout_policy(tmp_path, tokenizer, caplog):
    data = task_dataset(get_task("add").generate(0, 4, 1))
    # one optimiser step per generation (steps_per_generation = gradient_accumulation_steps = 1): δ ≡ 0
    MTPGRPOTrainer(build_tiny_model(tokenizer), reward_funcs=distinct_chars, args=config(tmp_path),
                   train_dataset=data, processing_class=tokenizer, mtp_regime="occ")
    assert "OCC's λ stays 0" in caplog.text
