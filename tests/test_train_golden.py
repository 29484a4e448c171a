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
        (-0.8863636255264282, 10.75, 4.58597731590271, 0.08559657260775566, 3.1129311537370086e-05,
         0.7334834933280945, 0.4602305144071579, 0.10000000149011612, 1.0, 0.008955921046435833,
         1.7445255517959595),
        (-0.9545454382896423, 12.0, 4.585940361022949, 0.05693507939577103, 1.2064352631568909e-05,
         0.6402849107980728, 0.4596900939941406, 0.10000000149011612, 1.0, 0.005826788488775492, 1.3193439245224),
        (-0.9318181872367859, 12.0, 4.585779666900635, 0.08931764215230942, 6.346652753563831e-06, 0.61151123046875,
         0.46182194352149963, 0.10000000149011612, 1.0, -0.01288906205445528, 1.5026155710220337),
    ],
    "occ": [
        (-0.8863636255264282, 10.75, 4.585960626602173, 0.08539880625903606, 3.3442127460148185e-05,
         0.7185957729816437, -0.00013569365546572953, 0.0029118710663169622, 0.02911871112883091,
         0.031100787222385406, 0.8742619752883911),
        (-0.9545454382896423, 12.0, 4.585987091064453, 0.05687100440263748, 1.1513630852277856e-05,
         0.6328775584697723, 0.00032497270149178803, 0.001304199337027967, 0.013041992671787739,
         0.00524741318076849, 0.15532656013965607),
        (-0.9318181872367859, 12.0, 4.585769891738892, 0.08913981169462204, 6.2665590121468995e-06,
         0.5906785875558853, -0.0018422137945890427, -0.007756843697279692, -0.0775684341788292,
         0.003998252563178539, 0.1351868361234665),
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
