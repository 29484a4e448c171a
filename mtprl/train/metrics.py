"""Where training metrics go: `metrics.jsonl` always, an accelerate tracker when asked, a progress bar.

Each line of `metrics.jsonl` is one JSON object `{"kind": "train" | "eval", "step": int,
"time": seconds since the run started, ...flat float keys}`. On resume the file is cut back to
the checkpoint's step first, so lines logged after the checkpoint by the interrupted process
are not repeated. Only the main process writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file, in order (a torn last line is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_after(path: Path, step: int) -> None:
    """Keep only the records of `path` with step <= `step` (and drop a torn last line)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null, and a float is written as a float."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only JSONL metrics plus an optional accelerate tracker (`accelerator.log`)."""

    def __init__(self, path: Path, accelerator=None, enabled: bool = True):
        self.path, self.accelerator, self.enabled = path, accelerator, enabled
        self._handle = path.open("a") if enabled else None

    def log(self, kind: str, step: int, time: float, values: dict[str, float]) -> dict[str, Any]:
        """Write one record (and send its finite values to the tracker, if any); returns the record."""
        record = {"kind": kind, "step": int(step), "time": round(float(time), 3)}
        record.update({k: _clean(float(v)) for k, v in values.items()})
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in values.items() if math.isfinite(v)}, step=int(step))
        return record

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.end_training()


class Progress:
    """A tqdm bar over the training steps showing reward, accuracy and the MTP λ (main process only)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, values: dict[str, float]) -> None:
        if self.bar is None:
            return
        shown = {"reward": values.get("reward/mean"), "acc": values.get("acc"), "λ": values.get("mtp/0/lambda")}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if v is not None}, refresh=False)
        self.bar.update(1)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Show `name` (say "eval step 0") instead of "train" while the block runs."""
        if self.bar is not None:
            self.bar.set_description(name)
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.set_description("train")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
