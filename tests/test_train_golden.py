"""Golden numbers: a tiny `mtprl train` run at a fixed seed, its metrics pinned.

The run: the tiny random checkpoint of `conftest.tiny_checkpoint` (seed 0), `small_train_config` with 3 steps,
the exact gradient terms every step, one torch thread, regimes `ce` and `occ` (between them they exercise
sampling, rewards and group advantages, the clipped surrogate, the MTP cross-entropy and the OCC proxy, the
exact terms, AdamW and the scheduler). Every other test checks a property; this one notices any change in
what the trainer computes, including ones that keep every property (a reordered sum in the loss, another
aggregation, a changed default).

Tolerance: relative 1e-4 (absolute 1e-9 for values near 0). Here the run is bit-identical with one and two
threads; on another CPU, float32 kernels may differ in the last bits (~1e-7 relative per operation), which
three steps of AdamW amplify to well under 1e-5. A change of the maths moves the numbers far more: λ₀ = 0.1001
instead of 0.1 already shifts `mtp/0/lambda` of ce by 1e-3. A different sampled token (a last-bit difference
landing exactly on a sampling boundary, or a changed sampler) changes the rewards and lengths of every later
step, and the test fails loudly rather than passing a different run.

If a change is meant to alter these numbers (a fixed bug, a new default), rerun the run, check that the new
numbers are what the change should give, and replace them here saying so in the commit.
"""

import pytest

from conftest import small_train_config
from mtprl.train import train
from mtprl.train.metrics import read_metrics

# Per regime, one row per step: the values of KEYS.
KEYS = (
    "batch/reward_mean", "response_len/mean", "entropy", "pg/loss", "pg/approx_kl", "grad_norm", "mtp/0/loss",
    "mtp/0/lambda", "mtp/0/c_hat", "exact/0/dot", "exact/0/g_mtp_sq",
)
GOLDEN = {
    "ce": [
        (-0.8863636255264282, 10.75, 4.585926532745361, 0.08452498354017735, 3.3500946301501244e-05,
         0.7302428483963013, 0.46030329167842865, 0.10000000149011612, 1.0, 0.01891525834798813, 1.783204436302185),
        (-0.9545454382896423, 12.0, 4.585949182510376, 0.057052530348300934, 1.2204672202642541e-05,
         0.6167180985212326, 0.4591419994831085, 0.10000000149011612, 1.0, -0.015514714643359184,
         1.4646769762039185),
        (-0.9318181872367859, 12.0, 4.585756778717041, 0.08952523022890091, 7.210299372673035e-06,
         0.6168222278356552, 0.4602808505296707, 0.10000000149011612, 1.0, -0.016469623893499374,
         1.4184987545013428),
    ],
    "occ": [
        (-0.8863636255264282, 10.75, 4.58592414855957, 0.08444319665431976, 2.9188237022026442e-05,
         0.7146413028240204, -0.00036897181416861713, 0.00828836765140295, 0.08288367837667465,
         0.022188328206539154, 0.8399457335472107),
        (-0.9545454382896423, 12.0, 4.585820436477661, 0.05670659989118576, 1.3568128451879602e-05,
         0.6350996196269989, 0.00037482843617908657, 0.0014933198690414429, 0.014933198690414429,
         0.003373926505446434, 0.15780216455459595),
        (-0.9318181872367859, 12.0, 4.585705041885376, 0.08922776579856873, 8.288149729196448e-06,
         0.6002814769744873, -0.00046709904563613236, -0.001963331364095211, -0.01963331364095211,
         0.002994549460709095, 0.13496404886245728),
    ],
}


@pytest.mark.parametrize("regime", sorted(GOLDEN))
def test_tiny_run_reproduces_its_golden_numbers(regime, tiny_checkpoint, tmp_path, one_thread):
    cfg = small_train_config(tiny_checkpoint, tmp_path / regime, regime=regime, steps=3, exact_every=1, eval_every=0)
    rows = [r for r in read_metrics(train(cfg) / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row, golden in zip(rows, GOLDEN[regime]):
        for key, value in zip(KEYS, golden):
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-9), (regime, row["step"], key)
