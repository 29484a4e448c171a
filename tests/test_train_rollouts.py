"""Pieces of the rollout step and the batch layout: overlong shaping, dynamic sampling, streams, shares."""

import torch

from mtprl.train.batch import TrainBatch, derive_seed, minibatch_rows
from mtprl.train.data import ProblemStream, build_problems, encode_prompts
from mtprl.train.config import TrainConfig
from mtprl.train.distributed import Dist
from mtprl.train.rollouts import mixed_groups, overlong_penalty, select_groups


def test_overlong_penalty_by_hand():
    # L_max = 12, buffer 4: no penalty up to 12 − 4 = 8 tokens, then −(len − 8) / 4 · penalty.
    lengths = torch.tensor([5, 8, 9, 10, 12])
    assert overlong_penalty(lengths, 12, 4, 0.5).tolist() == [0.0, 0.0, -0.125, -0.25, -0.5]
    assert overlong_penalty(lengths, 12, 0, 0.5).tolist() == [0.0] * 5


def test_dynamic_sampling_keeps_mixed_groups_first_then_fills_in_draw_order():
    draw0 = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # group 0 all equal, group 1 mixed
    draw1 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0])  # group 0 all equal, group 1 mixed
    assert mixed_groups(draw0, 4) == [False, True]
    assert select_groups([draw0, draw1], 4, 2, dynamic=True) == [(0, 1), (1, 1)]
    assert select_groups([draw0, draw1], 4, 3, dynamic=True) == [(0, 1), (1, 1), (0, 0)]
    assert select_groups([draw0], 4, 2, dynamic=False) == [(0, 0), (0, 1)]


def test_problem_stream_resumes_at_its_position():
    cfg = TrainConfig(seed=3, families=["add", "sort"])
    first, _, _ = build_problems(cfg)
    straight = first.take(8)
    again, reward, suites = build_problems(cfg)
    again.seek(5)
    assert again.take(3) == straight[5:] and again.position == 8
    assert set(suites) == {"add-easy", "add-hard", "expr-easy", "expr-hard", "sort-easy", "sort-hard"}
    problem = straight[0]
    assert reward(problem, problem.solution) == 1.0 and reward(problem, "#### nonsense") == 0.0
    stream = ProblemStream(lambda: iter(range(10)), position=4)
    assert stream.take(2) == [4, 5]
    stream.seek(1)  # going back restarts the stream
    assert stream.take(1) == [1]


def test_prompts_encode_with_specials_or_chat_template_and_keep_their_end():
    from mtprl.model import build_tokenizer
    from mtprl.tasks import Problem

    tok = build_tokenizer()
    problem = Problem(prompt="12+3=?\n", answer="15", solution="", family="add", difficulty=1)
    (ids,) = encode_prompts(tok, [problem], chat_template=False, max_tokens=100)
    assert ids == tok("12+3=?\n")["input_ids"] and ids[0] == tok.bos_token_id
    (cut,) = encode_prompts(tok, [problem], chat_template=False, max_tokens=3)
    assert cut == ids[-3:]  # long prompts keep their last tokens
    tok.chat_template = ("{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
                         "{% if add_generation_prompt %}>{% endif %}")
    (chat,) = encode_prompts(tok, [problem], chat_template=True, max_tokens=100)
    assert tok.decode(chat) == "[12+3=?\n]>"


def test_shares_cover_the_rows_once():
    dist = Dist()
    dist.world = 3
    shares = [dist.share(10, r) for r in range(3)]
    assert [(s.start, s.stop) for s in shares] == [(0, 4), (4, 7), (7, 10)]


def test_minibatches_are_a_seeded_partition():
    rows = minibatch_rows(16, 4, seed=0, step=3, epoch=1)
    assert sorted(torch.cat(rows).tolist()) == list(range(16)) and [len(r) for r in rows] == [4] * 4
    assert all(torch.equal(a, b) for a, b in zip(rows, minibatch_rows(16, 4, seed=0, step=3, epoch=1)))
    assert not torch.equal(torch.cat(rows), torch.cat(minibatch_rows(16, 4, seed=0, step=3, epoch=2)))
    assert derive_seed("a", 1) == derive_seed("a", 1) != derive_seed("a", 2)


def test_select_cuts_unused_padding_columns():
    # Row 0: prompt [5 6] response [7]; row 1: prompt [8] response [9 10 11]; prompt width 3, response width 4.
    ids = torch.tensor([[0, 5, 6, 7, 0, 0, 0], [0, 0, 8, 9, 10, 11, 0]])
    attn = ids != 0
    batch = TrainBatch.build(ids, attn, attn[:, 3:], torch.tensor([1.0, -1.0]), num_heads=1)
    one = batch.select(torch.tensor([0]))
    assert one.input_ids.tolist() == [[5, 6, 7]] and one.prompt_len == 2 and one.response_mask.tolist() == [[True]]
    both = batch.select(torch.tensor([1, 0]))
    assert both.input_ids.tolist() == [[0, 8, 9, 10, 11], [5, 6, 7, 0, 0]] and both.prompt_len == 2
    assert both.advantages.tolist() == [-1.0, 1.0]
    # Depth-1 head scores x_t when x_{t-2} is real: row 1 (prompt [8]) scores 10 and 11, not 9.
    assert both.head_mask[0].tolist() == [[False, True, True], [True, False, False]]


def test_metric_sums_weight_by_tokens():
    from mtprl.train.update import MetricSums

    sums = MetricSums()
    sums.add({"pg/loss": 0.25, "entropy": 2.0}, weight=3)
    sums.add({"pg/loss": 0.5, "entropy": 4.0}, weight=1)
    # Losses are shares of the mini-batch loss and add up; entropy is averaged by tokens: (3·2 + 1·4) / 4.
    assert sums.result(Dist()) == {"pg/loss": 0.75, "entropy": 2.5}
