"""Sweep of the shared RL settings on `detach` alone: the table behind the demo's recipe (docs/recipe-sweep.md).

    python benchmarks/sweep_recipe.py --output-dir runs/sweep --steps 60 --seeds 0 \\
        --setting "base:" --setting "lr3e-4:lr=3e-4" --setting "p32:prompts_per_step=32 mini_batches=4"

Each `--setting NAME:key=value ...` is one `mtprl compare --regimes detach` experiment in
OUTPUT_DIR/NAME whose shared settings are the demo's (`mtprl.compare.DEMO_SETTINGS`), then
`--fixed`, then the setting's own values. Every run of every setting is trained as a child
process, `--workers` at a time; the base is evaluated once (OUTPUT_DIR/base, the final
evaluation's sizes) and shared by all settings whose evaluation settings agree (the script
refuses a sweep where they differ: compare those separately). Finished runs are re-used. The
table printed (and written to OUTPUT_DIR/sweep.md) gives per setting: the final average accuracy
and its gain over the base (mean over seeds ± SE: over problems for one seed, over seeds
otherwise), the gain in SEs, greedy accuracy, the share of samples that copy the shortcut trace,
and the run time. Only `detach` is swept: the chosen settings are then used for every regime.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mtprl.compare import DEMO_SETTINGS, CompareConfig, evaluate_base, plan_runs, run_parallel, run_state
from mtprl.config import build_config
from mtprl.report import build_report


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, _, values = text.partition(":")
    if not name:
        raise SystemExit(f"--setting needs NAME:key=value ..., got {text!r}")
    return name, values.split()


def _cell(stat: dict | None, signed: bool = False) -> str:
    if not stat or not stat["n"]:
        return "—"
    se = "" if stat["se"] is None else f" ± {stat['se']:.3f}"
    return (f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}") + se


def table_rows(name: str, values: list[str], summary: dict) -> list[str]:
    metric = summary["headline"]
    acc = summary["accuracy"][metric]["detach"]["avg"]
    gain = summary["gain"].get(metric, {}).get("detach", {}).get("avg")
    greedy = summary["gain"].get("greedy", {}).get("detach", {}).get("avg")
    ratio = "—" if not gain or not gain["se"] else f"{gain['mean'] / gain['se']:.1f}"
    habits = [r.get("habit/avg/shortcut") for r in _final_rows(summary)]
    habit = "—" if not habits or None in habits else f"{sum(habits) / len(habits):.3f}"
    wall = summary["extras"]["detach"]["wall_time"]["mean"]
    return [name, " ".join(values) or "(demo settings)", str(acc["n"]), _cell(acc), _cell(gain, True), ratio,
            _cell(greedy, True), habit, "—" if wall is None else f"{wall:.0f}"]


def _final_rows(summary: dict) -> list[dict]:
    import json

    rows = []
    for run in summary["runs"]:
        lines = (Path(run["path"]) / "metrics.jsonl").read_text().splitlines()
        evals = [json.loads(line) for line in lines if '"kind": "eval"' in line]
        if evals:
            rows.append(evals[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/sweep")
    parser.add_argument("--setting", action="append", required=True, help="NAME:key=value ... (repeatable)")
    parser.add_argument("--fixed", nargs="*", default=[], help="key=value applied to every setting")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.output_dir)
    start = time.perf_counter()
    experiments = []
    for text in args.setting:
        name, values = parse_setting(text)
        cfg = build_config(CompareConfig, {"regimes": ["detach"], "seeds": args.seeds, "steps": args.steps,
                                           "set": args.fixed + values, "output_dir": str(out / name)})
        experiments.append((name, values, cfg, plan_runs(cfg)))
    first = experiments[0][3][0][1]
    base_settings = {k: getattr(first, k) for k in ("eval_k", "eval_temperature", "eval_limit", "final_eval_limit",
                                                    "max_new_tokens", "model", "eval_suites")}
    for name, _, _, runs in experiments:
        other = {k: getattr(runs[0][1], k) for k in base_settings}
        if other != base_settings:
            raise SystemExit(f"setting {name} evaluates differently ({other} vs {base_settings}); sweep it separately")
    todo = [(f"{name}/{run}", tc) for name, _, _, runs in experiments for run, tc in runs if run_state(tc) != "done"]
    print(f"{sum(len(r) for *_, r in experiments)} runs, {len(todo)} to run; demo settings: {' '.join(DEMO_SETTINGS)}",
          flush=True)
    base = evaluate_base(first, out / "base")
    print(f"base {base['weights_hash']}: " + ", ".join(f"{k} {v:.3f}" for k, v in base["values"].items()
                                                       if k.startswith("eval/avg/")), flush=True)
    if todo:
        run_parallel(todo, args.workers)
    headers = ["setting", "values", "seeds", "final avg", "gain over base", "gain / SE", "greedy gain",
               "shortcut share", "run time (s)"]
    rows = []
    for name, values, cfg, runs in experiments:
        summary = build_report([tc.output_dir for _, tc in runs], out / name / "report", base_dir=out / "base")
        rows.append(table_rows(name, values, summary))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines)
    (out / "sweep.md").write_text(text + "\n")
    print(text)
    print(f"wall time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
