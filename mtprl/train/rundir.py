"""The run directory's state at start-up: one writer at a time, what to resume, and nothing lost early.

`RunLock` makes a process the only writer of a run directory: an exclusive `flock` on
`run_dir/.lock`, which holds the owner's pid, host and start time. The kernel drops the lock when
its process dies however it dies, so a lock left by a crash is simply taken over (and said so); a
second live process is refused with the owner's pid. In a multi-process launch only rank 0 locks.

`plan_start` decides, before anything expensive and without writing, how the run starts:

- resume none: a fresh run; refused when the directory holds a run (metrics, summary or
  checkpoints), unless `overwrite`, which replaces it.
- resume auto: the newest checkpoint that verifies (newer damaged ones are named in a warning);
  refused when there are checkpoints but none verifies. Without a complete checkpoint: a fresh run
  in an empty directory (said so); refused in a directory that holds a run, whose metrics would be
  lost, unless `overwrite`, which starts it over.
- resume PATH: that checkpoint if it verifies; else refused with the `--resume` of the previous
  good one.

Resuming with result-affecting settings that differ from the checkpoint's is refused with the
list of differences (`result_differences`, the same rule `mtprl compare` re-uses runs by).

`commit_start` is the first write: called once the model is built, it removes what a fresh run
replaces (metrics, summary, checkpoints, per-problem eval results) or cuts the metrics back to the resumed step, and writes
config.yaml. A run that fails before that point leaves the directory as it found it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from mtprl.config import ConfigError, save_config
from mtprl.train.checkpoint import resumable_checkpoint, verify_checkpoint
from mtprl.train.config import TrainConfig, result_differences
from mtprl.train.metrics import truncate_after

try:
    import fcntl
except ImportError:  # not POSIX: an O_EXCL lock file whose owner's pid is checked instead
    fcntl = None

LOCK = ".lock"
_RUN_FILES = ("metrics.jsonl", "summary.json")
_RUN_DIRS = ("checkpoints", "evals")  # checkpoints, per-problem eval results


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class RunLock:
    """Exclusive, crash-safe lock on a run directory (`acquire` / `release`, or use as a context manager)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK
        self._fd: int | None = None
        self._made_dir = False
        self.stale: dict | None = None  # the record of a crashed owner whose lock was taken over

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def _refuse(self, holder: dict) -> ConfigError:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}"
        return ConfigError(f"run directory '{self.run_dir}' is in use by another mtprl process ({who}); wait for it "
                           f"to finish or stop it, or choose another --output-dir")

    def _open_locked(self) -> int:
        """An fd of the lock file holding the lock; the file may have been replaced between open and lock."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self._holder()) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:  # its owner released (and unlinked) it meanwhile
                same = False
            if same:
                return fd
            os.close(fd)

    def _open_exclusive(self) -> int:
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"]):
                    raise self._refuse(holder) from None
                self.stale = holder
                self.path.unlink(missing_ok=True)

    def acquire(self) -> "RunLock":
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"output_dir '{self.run_dir}' is a file, not a run directory; choose another --output-dir")
        self._made_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is not None:
            fd = self._open_locked()
            previous = self._holder()
            self.stale = previous if previous.get("pid") else None  # a lock file left behind by a crash
        else:
            fd = self._open_exclusive()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before the unlock: a waiting process then re-checks the path
        os.close(self._fd)
        self._fd = None
        if self._made_dir:
            try:
                self.run_dir.rmdir()  # only if the run wrote nothing else
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclasses.dataclass
class StartPlan:
    """How a run starts: from `resume_from` (None: fresh, replacing whatever run the directory holds); notes."""

    resume_from: Path | None
    notes: list[str]

    @property
    def step(self) -> int:
        """The step of the checkpoint resumed from (0 for a fresh run)."""
        if self.resume_from is None:
            return 0
        return int(json.loads((self.resume_from / "trainer_state.json").read_text())["step"])


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds (part of) a run: metrics, a summary or checkpoints."""
    return any((run_dir / n).exists() for n in _RUN_FILES) or (run_dir / "checkpoints").is_dir()


def _check_settings(cfg: TrainConfig, checkpoint: Path) -> None:
    recorded = json.loads((checkpoint / "trainer_state.json").read_text()).get("config", {})
    diff = result_differences(recorded, cfg)
    if diff:
        raise ConfigError(f"cannot resume from '{checkpoint}' with other result-affecting settings "
                          f"({'; '.join(diff)}); resume with the settings of that run, or start a new one (another "
                          "--output-dir, or --overwrite)")


def plan_start(cfg: TrainConfig, run_dir: Path) -> StartPlan:
    """Decide how the run starts (the table in the module docstring); reads, never writes."""
    existing = holds_run(run_dir)
    if cfg.resume == "none":
        if existing and not cfg.overwrite:
            raise ConfigError(f"run directory '{run_dir}' already holds a run (metrics.jsonl, summary.json or "
                              "checkpoints/); pass --resume to continue it, --overwrite to replace it, or another "
                              "--output-dir")
        notes = [f"--overwrite: the run in '{run_dir}' will be replaced once this one has started"] if existing else []
        return StartPlan(None, notes)
    if cfg.resume == "auto":
        path, notes = resumable_checkpoint(run_dir / "checkpoints")
        if path is None:
            if existing and not cfg.overwrite:
                raise ConfigError(f"--resume auto: run directory '{run_dir}' holds a run but no complete checkpoint "
                                  "to resume from (it stopped before its first save); pass --overwrite to start it "
                                  "over, replacing its metrics, or choose another --output-dir")
            notes.append(f"--resume auto: no checkpoint in '{run_dir}/checkpoints'; starting a fresh run")
            return StartPlan(None, notes)
    else:
        path, notes = Path(cfg.resume), []
        verify_checkpoint(path)
    _check_settings(cfg, path)
    return StartPlan(path, notes)


def commit_start(cfg: TrainConfig, run_dir: Path, plan: StartPlan) -> None:
    """The run's first write (rank 0, once the model is built): clear or cut back the old run, save config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.resume_from is None:
        for name in _RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        for name in _RUN_DIRS:
            shutil.rmtree(run_dir / name, ignore_errors=True)
    else:
        truncate_after(run_dir / "metrics.jsonl", plan.step)
    save_config(cfg, run_dir / "config.yaml")


def print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"mtprl train: {note}", file=sys.stderr, flush=True)
