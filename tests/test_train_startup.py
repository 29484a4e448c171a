"""A run a user can trust: cheap checks before expensive work, nothing lost early, one writer per run directory,
damaged checkpoints survived, changed settings refused on resume.

Each test stands for a probe of issue 16 (the number in its docstring is the finding).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import small_train_config as small_config
from mtprl.config import ConfigError
from mtprl.errors import UserError
from mtprl.train import train
from mtprl.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"time", "time/rollout_s", "time/update_s", "rollout/tokens_per_s"}
ROWS = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path) with the SHA-256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir / "metrics.jsonl")]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_checkpoint, tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2 (never modified: tests copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return train(small_config(tiny_checkpoint, out, save_every=1, exact_every=0))


@pytest.fixture()
def old_run(finished_run, tmp_path) -> Path:
    copy = tmp_path / "old-run"
    shutil.copytree(finished_run, copy)
    return copy


def bad_data_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error must say)."""
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    good_parquet = tmp_path / "good.parquet"
    pq.write_table(pyarrow.Table.from_pylist(ROWS * 50), good_parquet)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good_parquet.read_bytes()[: good_parquet.stat().st_size // 2])
    no_answer = [ROWS[0], {"problem": "What is 2 + 2?"}, ROWS[1]]
    return {
        "missing column": (write_jsonl(tmp_path / "no-answer.jsonl", no_answer), "row 2, column 'answer' is missing"),
        "empty file": (write_jsonl(tmp_path / "empty.jsonl", []), "has no rows"),
        "broken JSON": (write_jsonl(tmp_path / "broken.jsonl", [ROWS[0], '{"problem": "1+1", "ans']),
                        "row 2 is not valid JSON"),
        "truncated Parquet": (truncated, "not a readable Parquet file"),
    }


# ----- 1. cheap checks before expensive work -------------------------------------------------------------------------
def test_bad_data_on_an_empty_cache_fails_before_pretraining(tmp_path, monkeypatch):
    """Finding 1: a missing `answer` column with the embedded default and no cached base used to pre-train first."""
    import mtprl.pretrain as pretrain

    def no_pretraining(*args, **kwargs):
        raise AssertionError("pre-training started before the data was checked")

    monkeypatch.setenv("MTPRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "ensure_base_model", no_pretraining)
    data, message = bad_data_files(tmp_path)["missing column"]
    cfg = small_config("tiny-default", tmp_path / "run", data=str(data), eval_suites=[], exact_every=0)
    started = time.perf_counter()
    with pytest.raises(UserError, match=message):
        train(cfg)
    assert time.perf_counter() - started < 60  # seconds, not the minutes of a pre-training
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("kind", ["missing column", "empty file", "broken JSON", "truncated Parquet"])
@pytest.mark.parametrize("role", ["data", "eval_data"])
def test_bad_data_is_refused_before_anything_is_written(tiny_checkpoint, tmp_path, kind, role):
    """Finding 1: data errors used to surface after the model was loaded (a truncated Parquet as a raw traceback)."""
    bad, message = bad_data_files(tmp_path)[kind]
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    files = {"data": str(bad), "eval_data": [str(good)]} if role == "data" else {"data": str(good),
                                                                                "eval_data": [str(bad)]}
    with pytest.raises(UserError, match=message):
        train(small_config(tiny_checkpoint, tmp_path / "run", eval_suites=[], **files))
    assert not (tmp_path / "run").exists()


def test_model_directory_without_whole_weights_is_refused_before_writing(tiny_checkpoint, tmp_path):
    """Finding 1: a directory with config.json but no weights was refused only after config.yaml was written."""
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_checkpoint, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="has a config.json but no weight files"):
        train(small_config(no_weights, tmp_path / "run1"))
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=r"model\.safetensors' is truncated"):
        train(small_config(truncated, tmp_path / "run2"))
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()


# ----- 2. nothing deleted until the new run has started -------------------------------------------------------------
def test_overwrite_with_bad_input_leaves_the_old_run_byte_identical(tiny_checkpoint, old_run, tmp_path):
    """Finding 2: `--overwrite` with bad data deleted the old run's metrics, summary and checkpoints, then failed."""
    before = snapshot(old_run)
    bad, message = bad_data_files(tmp_path)["missing column"]
    with pytest.raises(UserError, match=message):
        train(small_config(tiny_checkpoint, old_run, overwrite=True, data=str(bad), eval_suites=[]))
    missing_model = tmp_path / "nowhere"
    missing_model.mkdir()
    (missing_model / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no weight files"):
        train(small_config(missing_model, old_run, overwrite=True))
    assert snapshot(old_run) == before


def test_overwrite_replaces_the_old_run_once_the_new_one_runs(tiny_checkpoint, old_run):
    train(small_config(tiny_checkpoint, old_run, overwrite=True, steps=1, exact_every=0))
    assert [(r["kind"], r["step"]) for r in read_metrics(old_run / "metrics.jsonl")] == [("train", 1), ("eval", 1)]
    assert sorted(p.name for p in (old_run / "checkpoints").iterdir()) == ["step-00000001"]
    assert yaml.safe_load((old_run / "config.yaml").read_text())["steps"] == 1


def test_resume_auto_without_a_checkpoint_keeps_the_metrics(tiny_checkpoint, old_run, capfd):
    """Finding 2: `--resume auto` with no checkpoint yet silently started over, deleting metrics.jsonl."""
    shutil.rmtree(old_run / "checkpoints")
    (old_run / "summary.json").unlink()
    before = snapshot(old_run)
    cfg = small_config(tiny_checkpoint, old_run, resume="auto", save_every=1, exact_every=0)
    with pytest.raises(ConfigError, match="holds a run but no complete checkpoint to resume from"):
        train(cfg)
    assert snapshot(old_run) == before
    # --overwrite says "start it over": the same settings then give the same metrics again.
    expected = comparable(old_run)
    train(small_config(tiny_checkpoint, old_run, resume="auto", overwrite=True, save_every=1, exact_every=0))
    assert comparable(old_run) == expected
    # An empty directory has nothing to lose: a fresh run, and it says so.
    capfd.readouterr()
    fresh = train(small_config(tiny_checkpoint, old_run.parent / "fresh", resume="auto", steps=1, exact_every=0))
    assert "no checkpoint in" in capfd.readouterr().err and (fresh / "summary.json").is_file()


# ----- 3. one writer per run directory ------------------------------------------------------------------------------
HOLDER = """
import sys, time
from mtprl.train.rundir import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_writer_is_refused_and_a_crashed_writers_lock_is_taken_over(tiny_checkpoint, old_run, capfd):
    """Finding 3: two processes on one folder both ran and wrote every row twice."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(old_run)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(old_run)
        for resume in ("auto", "none"):
            cfg = small_config(tiny_checkpoint, old_run, resume=resume, overwrite=True, steps=3)
            with pytest.raises(ConfigError, match=rf"in use by another mtprl process \(pid {holder.pid} on "):
                train(cfg)
        assert snapshot(old_run) == before
    finally:
        holder.kill()  # a crash: the lock file stays behind, the kernel's lock goes with the process
        holder.wait()
    assert (old_run / ".lock").is_file()
    capfd.readouterr()
    train(small_config(tiny_checkpoint, old_run, resume="auto", exact_every=0))
    assert f"the lock of pid {holder.pid}" in capfd.readouterr().err
    assert not (old_run / ".lock").exists()  # released at the end of the run


@pytest.mark.slow
def test_two_train_processes_on_one_folder(tiny_checkpoint, tmp_path):
    """Finding 3 as found: a second `mtprl train` (fresh or `--resume auto`) against a live run is refused."""
    run_dir = tmp_path / "run"
    cfg_file = tmp_path / "run.yaml"
    # More steps than the test waits for: the first run is stopped once the others were refused.
    cfg_file.write_text(yaml.safe_dump(vars(small_config(tiny_checkpoint, run_dir, steps=10_000, exact_every=0))))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "mtprl", "train", "--config", str(cfg_file)]
    first = subprocess.Popen(base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not any(r["kind"] == "train" for r in read_metrics_if_any(run_dir)) and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        others = [subprocess.Popen(base + extra, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                  for extra in (["--overwrite"], ["--resume", "auto"])]
        outputs = [p.communicate(timeout=600)[1] for p in others]  # a start takes seconds, more on a busy machine
        results = [(p.returncode, err) for p, err in zip(others, outputs)]
        assert first.poll() is None, "the first run ended before the others were tried"
    finally:
        first.terminate()
        _, err = first.communicate(timeout=60)
    for returncode, stderr in results:
        assert returncode == 2, stderr[-2000:]
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("mtprl train: error: run directory") and f"(pid {first.pid} on " in lines[-1]
        assert "Traceback" not in stderr
    steps = [(r["kind"], r["step"]) for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps and len(steps) == len(set(steps)) and steps[0] == ("train", 1)  # one writer, nothing cut back


def read_metrics_if_any(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []


# ----- 4. damaged checkpoints, changed settings ---------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated weights", "missing optimizer"])
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(tiny_checkpoint, finished_run, old_run, damage, capfd):
    """Finding 4: a truncated model.safetensors (marker present) gave a raw SafetensorError and no fallback."""
    latest = old_run / "checkpoints" / "step-00000002"
    if damage == "truncated weights":
        weights, name = latest / "model" / "model.safetensors", "model/model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (latest / "optimizer.pt").unlink()
        name = "optimizer.pt"
    (old_run / "summary.json").unlink()  # as after a crash right after the last save
    capfd.readouterr()
    train(small_config(tiny_checkpoint, old_run, resume="auto", save_every=1, exact_every=0))
    err = capfd.readouterr().err
    assert f"checkpoint '{latest}' is damaged ('{name}'" in err and "resuming from 'step-00000001' instead" in err
    assert comparable(old_run) == comparable(finished_run)  # the uninterrupted run's metrics


def test_explicit_resume_of_a_damaged_checkpoint_names_the_good_one(tiny_checkpoint, old_run):
    latest = old_run / "checkpoints" / "step-00000002"
    (latest / "trainer_state.json").write_text("{}")
    before = snapshot(old_run)
    cfg = small_config(tiny_checkpoint, old_run, resume=str(latest), save_every=1, exact_every=0)
    with pytest.raises(ConfigError, match=r"'trainer_state.json' has \d+ bytes where [\d,]+ were written") as err:
        train(cfg)
    assert f"--resume {old_run / 'checkpoints' / 'step-00000001'}" in str(err.value)
    assert snapshot(old_run) == before


def test_resume_with_other_result_affecting_settings_is_refused(tiny_checkpoint, old_run):
    """Finding 4: resuming with another --steps was accepted silently."""
    before = snapshot(old_run)
    cfg = small_config(tiny_checkpoint, old_run, resume="auto", save_every=1, exact_every=0, steps=3, lr=2e-3)
    with pytest.raises(ConfigError, match=r"other result-affecting settings \(steps: 2 there, 3 now; lr: 0.001 there, "
                                          r"0.002 now\)"):
        train(cfg)
    assert snapshot(old_run) == before
    # Settings that do not change the result may differ: a finished run resumed again is left as it is.
    train(small_config(tiny_checkpoint, old_run, resume="auto", save_every=2, exact_every=0, progress=True))
    assert snapshot(old_run)["metrics.jsonl"] == before["metrics.jsonl"]


# ----- 7. a quiet start ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_start_prints_the_launch_line_and_no_library_noise(tiny_checkpoint, tmp_path):
    """Finding 7: transformers' `past_key_values` FutureWarning, its "UNEXPECTED keys" table (our MTP weights) and
    math-verify's "Timeout is disabled" were printed at every start."""
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = small_config(tiny_checkpoint, tmp_path / "run", data=str(data), eval_data=[str(data)], eval_suites=[],
                       steps=1, exact_every=0, max_prompt_tokens=24, draft_tokens=1)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(vars(cfg)))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    done = subprocess.run([sys.executable, "-m", "mtprl", "train", "--config", str(cfg_file)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mtprl train: 1 process (world size 1, process-group backend "
                                                   "none), device cpu, 1 torch thread(s) per process"), done.stderr
    assert done.stdout.startswith("run finished in ")
