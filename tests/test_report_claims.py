"""The paper-claims verdicts of mtprl.report on in-memory runs with hand-chosen numbers."""

import pytest

from mtprl.report import Run, summarize

NOT_MEASURABLE = "not measurable (missing data)"


def make_run(regime, seed, final, curve=(), train=()):
    """A run whose only eval metric is the average avg@4; `curve` is [(step, value)] of eval rows."""
    evals = [{"kind": "eval", "step": step, "eval/avg/avg@4": v} for step, v in curve]
    return Run(path=f"runs/{regime}-s{seed}", regime=regime, seed=seed, config={}, train=list(train), evals=evals,
               final={"eval/avg/avg@4": final}, final_step=curve[-1][0] if curve else None, wall_time=1.0,
               finished=True)


def claims(runs):
    return {c["id"]: c for c in summarize(runs)["claims"]}


def detach(*finals):
    return [make_run("detach", seed, v) for seed, v in enumerate(finals)]


def test_claim_2_ce_below_detach_needs_the_interval_below_zero():
    # diffs ce − detach: −0.2, −0.25, −0.25: mean −0.23333, sd 0.028868, half = 4.3027·sd/√3 = 0.071711
    # -> CI [−0.305, −0.162], entirely below 0: worse -> reproduced.
    ce = [make_run("ce", s, v) for s, v in enumerate((0.3, 0.35, 0.3))]
    claim = claims(detach(0.5, 0.6, 0.55) + ce)[2]
    assert claim["verdict"] == "reproduced"
    assert claim["evidence"]["mean"] == pytest.approx(-0.233333, abs=1e-6)
    assert claim["evidence"]["ci_high"] == pytest.approx(-0.161622, abs=1e-5)
    # diffs −0.05, +0.05, −0.05: the interval straddles 0 -> within noise -> not reproduced.
    ce = [make_run("ce", s, v) for s, v in enumerate((0.45, 0.65, 0.5))]
    claim = claims(detach(0.5, 0.6, 0.55) + ce)[2]
    assert claim["verdict"] == "not reproduced" and "within noise" in claim["explanation"]


def test_claims_with_one_seed_are_not_tested_whatever_the_direction():
    # occ 0.4 − detach 0.5 = −0.1 with a single seed: no interval, so neither verdict; the number is shown.
    claim = claims(detach(0.5) + [make_run("occ", 0, 0.4)])[1]
    assert claim["verdict"] == "not tested (one seed)"
    assert "-0.100 (one seed: no test)" in claim["explanation"]
    assert claims(detach(0.5) + [make_run("occ", 0, 0.6)])[1]["verdict"] == "not tested (one seed)"
    assert claims(detach(0.5) + [make_run("ce", 0, 0.3)])[2]["verdict"] == "not tested (one seed)"
    # Claim 3 with one seed: no rise-then-fall (a rising curve) and a (b) without interval -> not tested.
    policy = make_run("policy", 0, 0.3, curve=[(0, 0.1), (1, 0.2), (2, 0.3)])
    assert claims(detach(0.5) + [policy])[3]["verdict"] == "not tested (one seed)"
    # Seeds that do not match leave nothing to pair.
    claim = claims(detach(0.5) + [make_run("occ", 7, 0.9)])[1]
    assert claim["verdict"] == NOT_MEASURABLE and "no seed" in claim["explanation"]


def test_claim_3_rise_then_fall_one_seed():
    # Curve 0.40, 0.55, 0.50, 0.35: changes +0.15, −0.05, −0.15, their sd (ddof 1) = 0.152753,
    # σ = 0.152753/√2 = 0.108012. Peak 0.55 at step 5 (inside), above first by 0.15 and last by 0.20, both > σ.
    # Ends above detach (0.35 − 0.30 = +0.05), so only part (a) holds.
    policy = make_run("policy", 0, 0.35, curve=[(0, 0.40), (5, 0.55), (10, 0.50), (15, 0.35)])
    claim = claims(detach(0.30) + [policy])[3]
    assert claim["verdict"] == "reproduced"
    curve = claim["evidence"]["curve"]
    assert curve["noise"] == pytest.approx(0.108012, abs=1e-6)
    assert curve["peak_step"] == 5 and curve["rise_then_fall"] and claim["evidence"]["ends_below"] is False


def test_claim_3_noise_from_seeds_and_failure():
    # Two seeds: (0.4, 0.6, 0.4) and (0.4, 0.5, 0.4); mean (0.4, 0.55, 0.4), per-step sd (0, 0.1/√2, 0),
    # σ = mean = 0.023570; the peak clears both ends by 0.15 > σ.
    runs = [make_run("policy", 0, 0.4, curve=[(0, 0.4), (1, 0.6), (2, 0.4)]),
            make_run("policy", 1, 0.4, curve=[(0, 0.4), (1, 0.5), (2, 0.4)])]
    claim = claims(runs)[3]  # no detach run: only part (a) is measurable
    assert claim["verdict"] == "reproduced" and claim["evidence"]["curve"]["noise"] == pytest.approx(0.023570, abs=1e-6)
    assert "(b) not measurable" in claim["explanation"]
    # Rising curves that end above detach (diffs +0.2, +0.22: the interval lies above 0) show neither part.
    policy = [make_run("policy", s, end, curve=[(0, 0.4), (1, 0.5), (2, 0.6), (3, end)]) for s, end in enumerate((0.7, 0.72))]
    assert claims(detach(0.5, 0.5) + policy)[3]["verdict"] == "not reproduced"


def test_claim_3_ends_below_detach():
    # No rise-then-fall (two eval steps), but policy − detach = −0.2, −0.25, −0.25: worse (as in claim 2).
    policy = [make_run("policy", s, v, curve=[(0, 0.1), (1, v)]) for s, v in enumerate((0.3, 0.35, 0.3))]
    claim = claims(detach(0.5, 0.6, 0.55) + policy)[3]
    assert claim["verdict"] == "reproduced" and claim["evidence"]["ends_below"] is True
    assert claim["evidence"]["curve"] is None


def exact_rows(dots, pens):
    return [{"kind": "train", "step": step, "exact/0/dot": d, "exact/0/g_mtp_sq": p}
            for step, (d, p) in enumerate(zip(dots, pens), start=1)]


def test_claim_4_correlation_decays_penalty_persists():
    # Steps 1..9, T = 9: first third steps 1–3, last third steps 7–9.
    # dot: first (1.0, 0.8, 0.6) mean 0.8, last (0.2, 0.1, 0.0) mean 0.1 < 0.5·0.8 -> decays.
    # penalty: first 2.0, last 1.5 >= 0.5·2.0 -> persists.
    dots = [1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.2, 0.1, 0.0]
    run = make_run("policy", 0, 0.5, train=exact_rows(dots, [2.0] * 3 + [1.8] * 3 + [1.5] * 3))
    claim = claims([run])[4]
    assert claim["verdict"] == "reproduced"
    expected = {"dot_first": 0.8, "dot_last": 0.1, "pen_first": 2.0, "pen_last": 1.5}
    assert claim["evidence"]["mean"] == pytest.approx(expected)
    # The penalty fading too (2.0 -> 0.5 < 1.0) breaks "persists".
    run = make_run("policy", 0, 0.5, train=exact_rows(dots, [2.0] * 3 + [1.0] * 3 + [0.5] * 3))
    assert claims([run])[4]["verdict"] == "not reproduced"
    # Exact rows only early: the last third is empty.
    run = make_run("policy", 0, 0.5, train=exact_rows(dots[:3], [2.0] * 3) + [{"kind": "train", "step": 9}])
    assert claims([run])[4]["verdict"] == NOT_MEASURABLE


def proxy_rows(pairs):
    return [{"kind": "train", "step": step, "exact/0/slope": s, "exact/0/proxy_c_hat": p}
            for step, (s, p) in enumerate(pairs, start=1)]


def test_claim_5_proxy_tracks_exact_slope():
    # proxy = 2·slope ± 0.1: r is close to 1 and p tiny over 10 rows.
    pairs = [(x, 2 * x + (0.1 if x % 2 else -0.1)) for x in range(1, 11)]
    claim = claims([make_run("occ-exact", 0, 0.5, train=proxy_rows(pairs))])[5]
    assert claim["verdict"] == "reproduced"
    assert claim["evidence"]["pearson_r"] > 0.99 and claim["evidence"]["p"] < 1e-6 and claim["evidence"]["n"] == 10
    # A constant proxy cannot be correlated; non-OCC regimes do not count.
    flat = [(x, 1.0) for x in range(1, 6)]
    assert "constant" in claims([make_run("occ", 0, 0.5, train=proxy_rows(flat))])[5]["explanation"]
    assert claims([make_run("policy", 0, 0.5, train=proxy_rows(pairs))])[5]["verdict"] == NOT_MEASURABLE
