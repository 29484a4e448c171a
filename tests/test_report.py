"""mtprl report on hand-made run directories: table numbers, paired comparison, figures, CLI, bad input.

The runs: regimes detach and occ, seeds 0 and 1, suites add-easy and modexpr-hard. Final avg@4:
    detach s0: add 0.5, mod 0.3, avg 0.4      detach s1: add 0.6, mod 0.4, avg 0.5
    occ    s0: add 0.7, mod 0.3, avg 0.5      occ    s1: add 0.9, mod 0.5, avg 0.7
greedy averages: detach 0.3, 0.4; occ 0.4, 0.3. MTP accept: detach 0.8, 0.7; occ 0.6, 0.7.
Wall time: detach 100, 110; occ 120, 130.
"""

import json
import math
import struct

import pytest
import yaml

from mtprl.cli import main
from mtprl.report import ReportError, Run, build_report, format_summary_table, load_runs, summarize
from mtprl.report.summary import group_runs

SUITES = ("add-easy", "modexpr-hard")
# (regime, seed): (avg@4 per suite, greedy per suite, mtp_accept, wall_time)
FINAL = {
    ("detach", 0): ((0.5, 0.3), (0.4, 0.2), 0.8, 100.0),
    ("detach", 1): ((0.6, 0.4), (0.4, 0.4), 0.7, 110.0),
    ("occ", 0): ((0.7, 0.3), (0.6, 0.2), 0.6, 120.0),
    ("occ", 1): ((0.9, 0.5), (0.4, 0.2), 0.7, 130.0),
}
# occ exact rows (exact slope, proxy ĉ) by (seed, step); pooled they are x = (1,2,3,4), y = (1,3,2,4).
EXACT = {(0, 2): (1.0, 1.0), (0, 4): (2.0, 3.0), (1, 2): (3.0, 2.0), (1, 4): (4.0, 4.0)}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def final_eval(regime, seed):
    acc, greedy, accept, _ = FINAL[(regime, seed)]
    out = {}
    for i, suite in enumerate(SUITES):
        out[f"eval/{suite}/avg@4"] = acc[i]
        out[f"eval/{suite}/greedy"] = greedy[i]
    out["eval/avg/avg@4"] = sum(acc) / 2
    out["eval/avg/greedy"] = sum(greedy) / 2
    out["eval/mtp_accept"] = accept
    return out


def train_row(regime, seed, step, exact=True):
    row = {"kind": "train", "step": step, "time": 10.0 * step, "entropy": 1.0 + 0.1 * step,
           "rollout/accept_rate": 0.8 - 0.02 * step, "pg/loss": 0.1}
    if regime == "occ":
        row.update({"mtp/0/lambda": 0.01 * step, "mtp/0/c_hat": 0.1 * step})
        if exact and (seed, step) in EXACT:
            slope, proxy = EXACT[(seed, step)]
            row.update({"exact/0/dot": 0.5, "exact/0/g_mtp_sq": 2.0, "exact/0/slope": slope,
                        "exact/0/proxy_c_hat": proxy})
    return row


def write_run(root, regime, seed, finished=True, exact=True):
    """A run directory: 6 train steps, evals at steps 0, 3, 6 (the last equal to the final numbers)."""
    run_dir = root / f"{regime}-s{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"regime": regime, "seed": seed, "mtp_coef": 0.1, "steps": 6}))
    final = final_eval(regime, seed)
    rows = [train_row(regime, seed, step, exact) for step in range(1, 7)]
    rows += [{"kind": "eval", "step": step, "time": 10.0 * step + 1, **{k: v * scale for k, v in final.items()}}
             for step, scale in ((0, 0.5), (3, 0.8), (6, 1.0))]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if finished:  # the trainer's layout: final eval metrics nested under "eval", keys kept whole
        summary = {"regime": regime, "seed": seed, "steps": 6, "wall_time": FINAL[(regime, seed)][3], "eval": final}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    return [write_run(tmp_path / "runs", regime, seed) for regime, seed in FINAL]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report of the four runs, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("shared")
    out = root / "report"
    return build_report([write_run(root / "runs", regime, seed) for regime, seed in FINAL], out), out


def test_summary_numbers_equal_the_metrics_files(report):
    summary, _ = report
    assert summary["suites"] == list(SUITES) and summary["metrics"] == ["avg@4", "greedy"]
    assert summary["regimes"] == ["detach", "occ"] and summary["headline"] == "avg@4"
    acc = summary["accuracy"]["avg@4"]
    for (regime, seed), (values, _, _, _) in FINAL.items():
        assert acc[regime]["add-easy"]["values"][str(seed)] == values[0]
        assert acc[regime]["modexpr-hard"]["values"][str(seed)] == values[1]
    # detach avg: (0.4 + 0.5)/2 = 0.45, sd 0.1/√2; occ avg: (0.5 + 0.7)/2 = 0.6, sd 0.2/√2.
    assert acc["detach"]["avg"]["mean"] == pytest.approx(0.45)
    assert acc["detach"]["avg"]["std"] == pytest.approx(0.1 / math.sqrt(2))
    assert acc["occ"]["avg"]["mean"] == pytest.approx(0.6)
    assert acc["occ"]["avg"]["std"] == pytest.approx(0.2 / math.sqrt(2))
    assert acc["occ"]["modexpr-hard"]["mean"] == pytest.approx(0.4) and acc["occ"]["avg"]["n"] == 2
    extras = summary["extras"]
    assert extras["occ"]["eval/mtp_accept"]["mean"] == pytest.approx(0.65)
    assert extras["detach"]["wall_time"]["mean"] == pytest.approx(105.0)
    # greedy avg: detach (0.3, 0.4) -> 0.35; occ (0.4, 0.3) -> 0.35.
    assert summary["accuracy"]["greedy"]["occ"]["avg"]["mean"] == pytest.approx(0.35)


def test_paired_comparison_against_detach(report):
    summary, _ = report
    avg = summary["paired"]["avg@4"]["occ"]["avg"]
    # diffs by seed: s0 0.5 − 0.4 = +0.1, s1 0.7 − 0.5 = +0.2; mean 0.15, sd 0.1/√2, se 0.05,
    # t(0.975, 1) = 12.7062 -> CI 0.15 ± 0.63531 = [-0.48531, 0.78531]: within noise.
    # Sign test: 2 of 2 positive -> p = 2·(1/2)² = 0.5.
    assert avg["seeds"] == ["0", "1"]
    assert avg["diffs"] == pytest.approx([0.1, 0.2])
    assert avg["mean"] == pytest.approx(0.15)
    assert avg["ci_low"] == pytest.approx(-0.48531, abs=1e-4) and avg["ci_high"] == pytest.approx(0.78531, abs=1e-4)
    assert avg["p_sign"] == pytest.approx(0.5) and avg["verdict"] == "within noise"
    # greedy avg diffs: +0.1, −0.1 -> sign test 2·(1 + 2)/4 capped at 1.
    greedy = summary["paired"]["greedy"]["occ"]["avg"]
    assert greedy["mean"] == pytest.approx(0.0, abs=1e-12) and greedy["p_sign"] == 1.0
    assert "detach" not in summary["paired"]["avg@4"]


def test_report_md_tables_show_the_numbers(report):
    _, out = report
    text = (out / "report.md").read_text()
    # regime | n | add-easy | modexpr-hard | avg | MTP accept | wall time (s); accuracies ± SE over the two
    # seeds (sd/√2: 0.1/√2/√2 = 0.05 for detach, 0.2/2 = 0.1 for occ), and so are the MTP and wall-time
    # columns, as the caption says (sd 0.071 and 7.1 -> SE 0.050 and 5.0)
    assert "| detach | 2 | 0.550 ± 0.050 | 0.350 ± 0.050 | 0.450 ± 0.050 | 0.750 ± 0.050 | 105.0 ± 5.0 |" in text
    assert "| occ | 2 | 0.800 ± 0.100 | 0.400 ± 0.100 | 0.600 ± 0.100 | 0.650 ± 0.050 | 125.0 ± 5.0 |" in text
    assert "highest mean average occ (0.600 ± 0.100), lowest detach (0.450 ± 0.050)" in text  # SE, as in the table
    assert "| occ | avg | s0: +0.100, s1: +0.200 | +0.150 | [-0.485, +0.785] | 0.500 | within noise |" in text
    assert "## Final accuracy — greedy" in text
    assert "Per suite: 0 of 2 tested comparisons fall outside the noise; about 0.1 would by chance" in text
    # Claim 1 holds (within noise counts as matching); claim 5: r = 0.8 but p = 1 − r = 0.2 (df 2).
    assert "(1) occ matches or beats detach: **reproduced**" in text
    assert "(2) ce falls below detach: **not measurable (missing data)**" in text
    assert "r = 0.800 (p = 0.2) over 4 exact rows" in text
    assert "'matches' means only 'not shown worse': the interval still allows -0.485" in text
    saved = json.loads((out / "summary.json").read_text())
    assert saved["accuracy"]["avg@4"]["occ"]["avg"]["mean"] == pytest.approx(0.6)
    assert [c["verdict"] for c in saved["claims"]] == [
        "reproduced", "not measurable (missing data)", "not measurable (missing data)",
        "not measurable (missing data)", "not reproduced"]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def test_figures_are_valid_pngs(report):
    summary, out = report
    files = {f["file"]: f for f in summary["figures"]}
    assert set(files) == {"accuracy_avg.png", "accuracy_suites.png", "occ_coefficients.png", "exact_terms.png",
                          "proxy_vs_exact.png", "mtp_acceptance.png", "entropy.png", "heldout_terms.png", "probe.png"}
    # these runs were logged without held-out terms and never probed: those figures alone are skipped
    assert not files.pop("heldout_terms.png")["written"] and not files.pop("probe.png")["written"]
    assert all(f["written"] for f in files.values())
    for name in files:
        (width, height), size = png_size(out / name)
        assert width > 100 and height > 100 and size > 5000
        assert f"]({name})" in (out / "report.md").read_text()


def test_missing_data_skips_figures_and_claims(tmp_path):
    dirs = [write_run(tmp_path / "runs", regime, seed, exact=False) for regime, seed in FINAL]
    out = tmp_path / "report"
    out.mkdir()
    (out / "proxy_vs_exact.png").write_bytes(PNG_SIGNATURE)  # a stale figure from an earlier report
    summary = build_report(dirs, out)
    skipped = {f["file"]: f["reason"] for f in summary["figures"] if not f["written"]}
    assert set(skipped) == {"exact_terms.png", "proxy_vs_exact.png", "heldout_terms.png", "probe.png"}
    assert not (out / "proxy_vs_exact.png").exists()
    text = (out / "report.md").read_text()
    assert f"Skipped: {skipped['exact_terms.png']}." in text
    assert summary["claims"][4]["verdict"] == "not measurable (missing data)"
    assert "0 exact row(s)" in summary["claims"][4]["explanation"]


def test_unfinished_run_uses_last_eval_row(tmp_path):
    dirs = [write_run(tmp_path / "runs", regime, seed, finished=(regime, seed) != ("occ", 1)) for regime, seed in FINAL]
    # Cut the unfinished run's log short: drop its final eval and leave half a line, as a crash would.
    metrics = dirs[3] / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    summary = build_report(dirs, tmp_path / "report")
    (occ1,) = [r for r in summary["runs"] if r["regime"] == "occ" and r["seed"] == 1]
    assert not occ1["finished"] and occ1["final_step"] == 3
    assert any("cut short" in note for note in occ1["notes"])
    # Its last eval (step 3) is 0.8 × the final numbers: avg 0.8·0.7 = 0.56; wall time = last 'time' = 60.
    assert summary["accuracy"]["avg@4"]["occ"]["avg"]["values"]["1"] == pytest.approx(0.56)
    assert summary["extras"]["occ"]["wall_time"]["values"]["1"] == pytest.approx(60.0)
    table = format_summary_table(summary)
    assert "occ *" in table and "unfinished" in table


def test_format_summary_table_is_aligned(report):
    summary, _ = report
    lines = format_summary_table(summary).splitlines()
    assert lines[0] == ("final accuracy (avg@4), mean ± standard error (over seeds when n > 1, over problems for one "
                        "run)")
    header, rule, detach, occ = lines[1:5]
    assert header.split() == ["regime", "n", "add-easy", "modexpr-hard", "avg", "MTP", "accept", "wall", "time", "(s)"]
    assert len({len(header), len(rule), len(detach), len(occ)}) == 1  # every row padded to the same width
    assert "0.450 ± 0.050" in detach and "0.600 ± 0.100" in occ


def test_cli_writes_report_and_prints_table(runs, tmp_path, capsys):
    out = tmp_path / "cli-report"
    assert main(["report", *map(str, runs), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0.450 ± 0.050" in printed and "claim (1) occ matches or beats detach: reproduced" in printed
    assert (out / "report.md").is_file() and (out / "summary.json").is_file()


def test_cli_bad_input_writes_nothing(runs, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["report", str(runs[0]), str(tmp_path / "missing"), "--output-dir", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_bad_inputs_raise_clear_errors(runs, tmp_path):
    out = tmp_path / "never"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="has no metrics.jsonl"):
        build_report([runs[0], empty], out)
    bad = runs[1] / "metrics.jsonl"
    lines = bad.read_text().splitlines(keepends=True)
    lines[7] = lines[7].replace('"step": 3', '"step": 3,,')  # line 8: the eval row of step 3
    bad.write_text("".join(lines))
    with pytest.raises(ReportError, match=r"metrics\.jsonl:8: not valid JSON"):
        build_report(runs, out)
    assert not out.exists()
    with pytest.raises(ReportError, match="no run directories"):
        load_runs([])


def test_malformed_last_line_of_a_finished_run_is_an_error(runs, tmp_path):
    metrics = runs[0] / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"kind": "eval", "st')
    with pytest.raises(ReportError, match=r"metrics\.jsonl:10: not valid JSON"):
        load_runs([runs[0]])


def test_rows_and_identity_are_checked(tmp_path):
    run_dir = write_run(tmp_path, "detach", 0)
    metrics = run_dir / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + json.dumps({"kind": "eval", "step": "7"}) + "\n")
    with pytest.raises(ReportError, match=r"metrics\.jsonl:10: a eval row needs an integer 'step'"):
        load_runs([run_dir])
    metrics.write_text(good + "[1, 2]\n")
    with pytest.raises(ReportError, match="expected a JSON object"):
        load_runs([run_dir])
    metrics.write_text(good)
    (run_dir / "config.yaml").unlink()  # regime and seed may come from summary.json alone
    assert (load_runs([run_dir])[0].regime, load_runs([run_dir])[0].seed) == ("detach", 0)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    (run_dir / "summary.json").write_text(json.dumps({"wall_time": 1.0}))
    with pytest.raises(ReportError, match="no 'regime'"):
        load_runs([run_dir])


def test_duplicate_regime_and_seed_and_out_dir_clash(runs, tmp_path):
    with pytest.raises(ReportError, match="both regime 'detach' seed 0"):
        load_runs([runs[0], runs[0]])
    with pytest.raises(ReportError, match="would overwrite its summary.json"):
        build_report(runs, runs[2])


@pytest.mark.parametrize("layout", ["flat", "nested by name"])
def test_summary_json_layouts_give_the_same_final_numbers(tmp_path, layout):
    run_dir = write_run(tmp_path, "occ", 1)
    final = final_eval("occ", 1)
    if layout == "flat":
        summary = {**final, "wall_time": 7.0, "regime": "occ", "seed": 1}
    else:  # {"eval": {suite: {metric: value}}}
        nested = {}
        for key, value in final.items():
            parts = key.split("/")[1:]
            node = nested
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        summary = {"eval": nested, "wall_time": 7.0, "regime": "occ", "seed": 1}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run,) = load_runs([run_dir])
    assert run.final == final and run.wall_time == 7.0 and run.finished and run.final_step == 6


def test_average_column_falls_back_to_the_suite_mean():
    # No eval/avg/greedy key: the average is the plain mean of the suites, (0.2 + 0.6)/2 = 0.4, and
    # None for a run missing a suite (so that regime's avg cell has n=1 of 2).
    def run(regime, seed, final):
        return Run(path=f"{regime}-{seed}", regime=regime, seed=seed, config={}, train=[], evals=[], final=final,
                   final_step=None, wall_time=None, finished=True)

    summary = summarize([run("detach", 0, {"eval/a/greedy": 0.2, "eval/b/greedy": 0.6}),
                         run("detach", 1, {"eval/a/greedy": 0.5})])
    avg = summary["accuracy"]["greedy"]["detach"]["avg"]
    assert avg["values"] == {"0": pytest.approx(0.4)} and avg["n"] == 1
    table = format_summary_table(summary)
    assert "0.400 (n=1)" in table and "0.350 ± 0.150" in table  # suite a: (0.2, 0.5), SE 0.3/√2/√2


def _figure_runs(tmp_path, draft_tokens):
    dirs = [write_run(tmp_path / "runs", regime, seed) for regime, seed in FINAL]
    for run_dir in dirs:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg, "draft_tokens": draft_tokens}))
    return group_runs(load_runs(dirs))


def test_acceptance_is_drawn_only_for_runs_that_drafted(tmp_path):
    """Finding 7: the report drew rollout acceptance as a flat 0 line when drafting was off."""
    from mtprl.report.figures import fig_mtp_acceptance

    titles = [ax.get_title() for ax in fig_mtp_acceptance(_figure_runs(tmp_path / "off", 0), {}).axes]
    assert "rollout acceptance (train)" not in titles and "MTP acceptance (eval)" in titles
    titles = [ax.get_title() for ax in fig_mtp_acceptance(_figure_runs(tmp_path / "on", 2), {}).axes]
    assert "rollout acceptance (train)" in titles


def test_step_ticks_are_whole_and_small_changes_stay_small(tmp_path):
    """Finding 7: fractional step ticks; y-axes that zoomed a 0.02 change into a collapse."""
    from mtprl.report.figures import FRACTION_SPAN, fig_accuracy_avg, fig_entropy, fig_mtp_acceptance

    groups = _figure_runs(tmp_path, 2)
    summary = summarize([run for runs in groups.values() for run in runs])
    figures = [fig_accuracy_avg(groups, summary), fig_entropy(groups, summary), fig_mtp_acceptance(groups, summary)]
    for fig in figures:
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ax.get_title()
    # Train acceptance moves 0.78 -> 0.68 over six steps (0.10) and is drawn on at least FRACTION_SPAN = 0.2, in [0, 1].
    accept = next(ax for ax in figures[2].axes if ax.get_title() == "rollout acceptance (train)")
    lo, hi = accept.get_ylim()
    assert hi - lo == pytest.approx(FRACTION_SPAN) and 0.0 <= lo and hi <= 1.0 and lo <= 0.68 and hi >= 0.78
    # Entropy 1.1 -> 1.6 spans more than a fifth of its level already: left as matplotlib drew it.
    entropy = figures[1].axes[0]
    assert entropy.get_ylim()[1] - entropy.get_ylim()[0] > 0.5
