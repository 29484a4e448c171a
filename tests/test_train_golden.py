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
        (-0.8863636255264282, 10.75, 4.585979700088501, 0.08567334525287151, 3.255119372624904e-05,
         0.7335644364356995, 4.601820945739746, 0.10000000149011612, -0.36665818095207214, 0.005683752242475748,
         1.7531241178512573),
        (-0.9545454382896423, 12.0, 4.585946559906006, 0.056941695511341095, 1.2232611879881006e-05,
         0.6401293277740479, 4.59706974029541, 0.10000000149011612, -0.016764139756560326, 0.005486103240400553,
         1.3254109621047974),
        (-0.9318181872367859, 12.0, 4.585788726806641, 0.08931655436754227, 6.360312454489758e-06,
         0.611393928527832, 4.618114948272705, 0.10000000149011612, 0.0061923605389893055, -0.013021109625697136,
         1.5043526887893677),
    ],
    "occ": [
        (-0.8863636255264282, 10.75, 4.585960626602173, 0.08539880625903606, 3.3442127460148185e-05,
         0.7185789942741394, 0.0847182497382164, 0.002418958581984043, 0.02418958581984043, 0.031852226704359055,
         0.8797971606254578),
        (-0.9545454382896423, 12.0, 4.585987329483032, 0.056871287524700165, 1.1513009667396545e-05,
         0.6328720599412918, 0.059815652668476105, 0.000893951510079205, 0.008939514867961407, 0.00528618972748518,
         0.1564243882894516),
        (-0.9318181872367859, 12.0, 4.585770130157471, 0.08914002776145935, 6.2659382820129395e-06,
         0.5907064825296402, 0.09166800603270531, -0.002335452474653721, -0.02335452474653721, 0.004121145233511925,
         0.13505546748638153),
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
