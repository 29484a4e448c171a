"""Reading math problems (question + reference answer) from local files.

Accepted sources: a JSON-lines file (`.jsonl` / `.json` with one object per line), a Parquet
file (`.parquet`), or a directory written by Hugging Face `datasets` (`save_to_disk`; a
DatasetDict needs `split`). Nothing is downloaded. Every row must hold a non-empty text in the
problem column and a non-empty text or number in the answer column; otherwise `MathDataError`
names the file, the row (1-based, the line number for JSON lines) and the column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from mtprl.errors import UserError


class MathDataError(UserError, ValueError):
    """A math data file is missing, unreadable, or has a malformed row; the message says where."""


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                raise MathDataError(f"{path}: row {line_no} is not valid JSON ({err.msg}); "
                                    "write one JSON object per line") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MathDataError(f"{path}: reading Parquet needs pyarrow; install it (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's errors (ArrowInvalid, OSError, ...) are tracebacks pages long
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MathDataError(f"{path}: not a readable Parquet file ({first}); it may be truncated or not Parquet at "
                            "all: write or copy it again") from None
    for index, row in enumerate(table.to_pylist(), start=1):
        yield index, row


def _iter_saved_dataset(path: Path, split: str | None) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise MathDataError(f"{path}: reading a saved dataset needs `datasets`; install it") from None
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split is None or split not in data:
            raise MathDataError(f"{path}: a dataset with splits {sorted(data)}; choose one with split=")
        data = data[split]
    for index, row in enumerate(data, start=1):
        yield index, row


def iter_rows(path: str | Path, split: str | None = None) -> Iterator[tuple[int, Any]]:
    """(1-based row number, row) pairs from a JSON-lines, Parquet or saved-dataset source."""
    path = Path(path)
    if not path.exists():
        raise MathDataError(f"math data '{path}' does not exist; pass a .jsonl or .parquet file or a "
                            "directory saved with datasets.save_to_disk")
    if path.is_dir():
        return _iter_saved_dataset(path, split)
    if path.suffix in (".jsonl", ".json"):
        return _iter_jsonl(path)
    if path.suffix == ".parquet":
        return _iter_parquet(path)
    raise MathDataError(f"math data '{path}': unknown file type '{path.suffix}'; use .jsonl, .json or .parquet")


def _text_field(path: Path, row_no: int, row: Any, column: str, numbers_ok: bool) -> str:
    where = f"{path}: row {row_no}, column '{column}'"
    if not isinstance(row, dict):
        raise MathDataError(f"{path}: row {row_no} is a {type(row).__name__}, not an object with a '{column}' column")
    if column not in row:
        raise MathDataError(f"{where} is missing (row has {sorted(row)}); set the column name option "
                            "if your data names it differently")
    value = row[column]
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise MathDataError(f"{where} must be a non-empty {'text or number' if numbers_ok else 'text'}, "
                            f"got {value!r}")
    return value.strip()


def read_math_rows(
    path: str | Path,
    problem_key: str = "problem",
    answer_key: str = "answer",
    split: str | None = None,
    limit: int | None = None,
) -> list[tuple[int, str, str]]:
    """Checked (row number, problem text, answer text) triples, at most `limit` of them."""
    rows = []
    for row_no, row in iter_rows(path, split):
        if limit is not None and len(rows) >= limit:
            break
        problem = _text_field(Path(path), row_no, row, problem_key, numbers_ok=False)
        answer = _text_field(Path(path), row_no, row, answer_key, numbers_ok=True)
        rows.append((row_no, problem, answer))
    if not rows:
        raise MathDataError(f"math data '{path}' has no rows")
    return rows
