"""Pre-training: schedules, batches, a tiny run that learns, determinism, greedy decoding."""

import dataclasses
import math
import random

import pytest
import torch

from mtprl.config import ConfigError, build_config
from mtprl.model import build_tokenizer
from mtprl.tasks import SUITE_SEED, Problem, eval_suites, get_task
from mtprl.pretrain.config import PretrainConfig
from mtprl.pretrain.data import encode_batch, trace_batches
from mtprl.pretrain.evaluate import greedy_completions, mtp_top1_agreement
from mtprl.pretrain.loop import build_base, loss_curve, lr_factor, mtp_weight_at, train_base

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(steps=40, batch_size=16, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, lr=1e-2,
            warmup_steps=5, suite_size=16, progress=False, threads=1)


def test_schedules_by_hand():
    # DeepSeek-V3 step schedule: 0.3 for steps < 0.7 * 100 = 70, then 0.1.
    assert mtp_weight_at(69, 100, 0.3, 0.1, 0.7) == 0.3
    assert mtp_weight_at(70, 100, 0.3, 0.1, 0.7) == 0.1
    # warm-up over 10 steps: step 0 -> 1/10, step 9 -> 10/10
    assert lr_factor(0, 110, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 110, 10, 0.1) == pytest.approx(1.0)
    # cosine from step 10 to 110: halfway (step 60) -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55; end -> 0.1
    assert lr_factor(60, 110, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(110, 110, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(35, 110, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_loss_curve_window_means():
    # 5 losses, 2 points -> windows of 2 steps: (1+2)/2, (3+4)/2, and the short last window 5
    assert loss_curve([1.0, 2.0, 3.0, 4.0, 5.0], points=2) == [[2, 1.5], [4, 3.5], [5, 5.0]]


def test_encode_batch_masks_the_completion_and_eos():
    tok = build_tokenizer()
    batch = encode_batch(tok, ["ab\n", "x\n"], ["#### 1", "#### 22"])
    # row 0: <bos> a b \n # # # # ␠ 1 <eos>  = 11 tokens; row 1: <bos> x \n + 7 + <eos> = 11 tokens
    assert batch.input_ids.shape == (2, 11)
    assert batch.input_ids[0, 0].item() == tok.bos_token_id and batch.input_ids[0, 10].item() == tok.eos_token_id
    assert batch.loss_mask[0].tolist() == [False] * 4 + [True] * 7
    assert batch.loss_mask[1].tolist() == [False] * 3 + [True] * 8
    assert batch.attention_mask.sum().item() == 22 and batch.num_tokens == 22
    assert tok.decode(batch.input_ids[1][batch.loss_mask[1]], skip_special_tokens=True) == "#### 22"


def _completions(batch, tok):
    rows = []
    for ids, loss_mask in zip(batch.input_ids, batch.loss_mask):
        prompt = tok.decode(ids[~loss_mask & (ids != tok.pad_token_id)], skip_special_tokens=True)
        rows.append((prompt, tok.decode(ids[loss_mask], skip_special_tokens=True)))
    return rows


def _family(prompt):
    return "sort" if prompt.startswith("sort") else ("expr" if " mod " in prompt else "add")


def test_trace_batches_draw_the_intended_mixture():
    # 50% shortcut, 10% slip, 40% correct, counted on 60 batches of 16 = 960 traces; each row is what its
    # kind says: the reference solution, the family's shortcut, or a slip that scores 0.
    tok = build_tokenizer()
    stream = trace_batches(tok, 0, 16, ["add", "expr", "sort"], [1, 2, 3], 0.5, 0.1, suite_seed=1, suite_size=8,
                           group_batches=4)
    counts = {"correct": 0, "shortcut": 0, "slip": 0}
    shortcut_right = shortcut_total = 0
    for _ in range(60):
        batch = next(stream)
        for (prompt, completion), kind in zip(_completions(batch, tok), batch.kinds):
            counts[kind] += 1
            family = _family(prompt)
            task, problem = get_task(family), _reference(family, prompt)
            reward = task.reward(problem, completion)
            if kind == "correct":
                assert reward == 1.0, (prompt, completion)
            elif kind == "slip":
                assert reward == 0.0, (prompt, completion)
            else:
                shortcut_total += 1
                shortcut_right += reward == 1.0
    n = sum(counts.values())
    assert n == 960
    # binomial sd at n = 960: sqrt(.25/960) = 0.016 for the 50% share; bounds at about 4 sd
    assert abs(counts["shortcut"] / n - 0.5) < 0.065
    assert abs(counts["slip"] / n - 0.1) < 0.04
    assert abs(counts["correct"] / n - 0.4) < 0.065
    # the shortcut is right on part of the problems only
    assert 0.2 < shortcut_right / shortcut_total < 0.8


def test_pretraining_batches_never_hold_a_suite_prompt():
    # Difficulty 1 only, so the raw generator would hit the 256-problem suites often (expr-easy has about
    # 6,000 distinct prompts); the batches must not.
    tok = build_tokenizer()
    held_out = {p.prompt for problems in eval_suites().values() for p in problems}
    raw = get_task("expr").generate(0, 3000, 1)
    assert held_out & {p.prompt for p in raw}
    stream = trace_batches(tok, 0, 32, ["add", "expr", "sort"], [1, 2], 0.5, 0.0, SUITE_SEED, 256)
    prompts = {prompt for _ in range(100) for prompt, _ in _completions(next(stream), tok)}
    assert len(prompts) > 2000 and not held_out & prompts


def test_trace_kind_rejects_a_mixture_over_one():
    with pytest.raises(ValueError, match="sum to at most 1"):
        next(trace_batches(build_tokenizer(), 0, 4, ["add"], [1], 0.8, 0.3, 1, 8))


def _reference(family, prompt):
    """Recompute the reference answer of a generated prompt from its text alone."""
    body = prompt.strip()
    if family == "sort":
        answer = " ".join(sorted(body.split()[1:], key=int))
    elif family == "expr":
        expr = body.split(" mod ")[0]
        answer = str(eval(expr) % 7)  # digits, + - * and brackets only: Python's precedence agrees
    else:
        answer = str(eval(body.rstrip("=?")))
    return Problem(prompt, answer, "", family, 1)


def test_trace_batches_are_deterministic():
    tok = build_tokenizer()
    a = trace_batches(tok, 3, 8, ["add", "sort"], [1], 0.3, 0.1, 1, 8, group_batches=2)
    b = trace_batches(tok, 3, 8, ["add", "sort"], [1], 0.3, 0.1, 1, 8, group_batches=2)
    for _ in range(3):
        x, y = next(a), next(b)
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_mask, y.loss_mask)


def test_tiny_pretraining_lowers_the_loss_and_is_deterministic():
    cfg = build_config(PretrainConfig, TINY)
    model, _, stats = train_base(cfg)
    losses = stats["loss_history"]
    assert len(losses) == 40
    # char-level start: about ln(99) = 4.6 nats; after 40 steps it must be clearly lower
    assert sum(losses[:5]) / 5 > 4.0
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    again, _, stats_again = train_base(cfg)
    assert stats_again["loss_history"] == losses
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))


def test_greedy_completions_match_an_unpadded_argmax_loop():
    # Left padding must not change what greedy decoding writes (positions count real tokens only).
    tok = build_tokenizer()
    cfg = build_config(PretrainConfig, TINY)
    model = build_base(cfg, tok).eval()
    prompts = ["12+34=?\n", "sort 3 1 2 9 8\n", "1*2 mod 7=?\n"]
    batched = greedy_completions(model, tok, prompts, max_new_tokens=6, batch_size=3)
    for prompt, got in zip(prompts, batched):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = model.base(input_ids=ids).logits[0, -1].argmax().item()
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert got == tok.decode(new, skip_special_tokens=True)


def test_mtp_agreement_has_one_value_per_depth():
    tok = build_tokenizer()
    cfg = build_config(PretrainConfig, {**TINY, "num_mtp_layers": 2})
    model = build_base(cfg, tok)
    problems = get_task("add").generate(random.Random(0), 4, 1)
    agreement = mtp_top1_agreement(model, tok, problems, batch_size=2)
    assert len(agreement) == 2 and all(0.0 <= a <= 1.0 for a in agreement)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"families": ["add", "mul"]}, "unknown: \\['mul'\\]"),
        ({"shortcut_fraction": 0.7, "slip_fraction": 0.4}, "sum to at most 1"),
        ({"hidden_size": 30, "num_heads": 4}, "must divide by num_heads"),
        ({"steps": 0}, "steps must be >= 1"),
    ],
)
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(PretrainConfig, {**TINY, **override})


def test_config_defaults_are_valid():
    cfg = build_config(PretrainConfig, {})
    assert dataclasses.asdict(cfg)["mtp_weight"] == 0.3
