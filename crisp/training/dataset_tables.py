"""Tables read through Hugging Face ``datasets``: json, jsonl and parquet files, a hub dataset, a saved folder.

Local files are read with ``load_dataset("json"/"parquet", data_files=...)`` and a folder with
``load_from_disk``, with ``datasets`` kept off the network (:func:`crisp.training.hub.datasets_offline`).
A JSON Lines row's place is its line (``train.jsonl:7``); every other row's is its index in its split,
as ``dataset[i]`` counts (``train.parquet, row 6``). A ClassLabel column's class names come with it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from crisp.core.errors import DataError
from crisp.training.delimited import utf8_text
from crisp.training.hub import datasets_offline
from crisp.training.rows import Rows


def table_of(part: Any, where: str, locate: Callable[[int], str], text_columns: tuple[str, ...],
             label_column: str, hint: str = "") -> Rows:
    """A split's (a ``datasets.Dataset``, or any mapping of columns) text and label columns."""
    names = list(part.column_names) if hasattr(part, "column_names") else list(part)
    missing = [c for c in (*text_columns, label_column) if c not in names]
    if missing:
        raise DataError(f"{where}: its columns {names!r} lack {', '.join(map(repr, missing))}{hint}")
    features = getattr(part, "features", None) or {}
    feature = features.get(label_column) if isinstance(features, Mapping) else None
    class_names = tuple(feature.names) if type(feature).__name__ == "ClassLabel" else None
    return Rows(where, [list(part[c]) for c in text_columns], list(part[label_column]), tuple(text_columns),
                 label_column, locate, class_names)


def _indexed(where: str) -> Callable[[int], str]:
    return lambda i: f"{where}, row {i}"


def _reason(err: BaseException) -> str:
    """What went wrong, in one line: the parser's error that ``datasets`` wraps in its own."""
    err = err.__cause__ or err
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _json_problem(raw: bytes, path: Path) -> str | None:
    """The first line that is no JSON object (JSON Lines), or where a JSON array breaks; None: none found."""
    text = raw.decode("utf-8")
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"{path}:{err.lineno}: the JSON array breaks at column {err.colno}: {err.msg}"
        return None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return (f"{path}:{number}: {line[:80]!r} is not allowed: it is not JSON ({err.msg}), and a JSON Lines file "
                    "holds one object a line")
        if not isinstance(row, dict):
            return f"{path}:{number}: {line[:80]!r} is not allowed: each line must be one JSON object"
    return None


def _row_places(raw: bytes, path: Path) -> Callable[[int], str]:
    """JSON Lines: each row is its line (blank lines hold none); one JSON array: each row is its index."""
    if raw.lstrip()[:1] == b"[":
        return _indexed(str(path))
    lines = [n for n, line in enumerate(raw.split(b"\n"), start=1) if line.strip()]
    return lambda i: f"{path}:{lines[i]}" if i < len(lines) else f"{path}, row {i}"


def read_file(path: Path, kind: str, text_columns: tuple[str, ...], label_column: str, hint: str = "") -> Rows:
    """A json/jsonl (``kind="json"``) or parquet file's text and label columns."""
    if kind == "json":
        raw = path.read_bytes()
        utf8_text(raw, path)
        locate = _row_places(raw, path)
    else:
        locate = _indexed(str(path))
    with datasets_offline() as datasets:
        quiet = logging.getLogger("datasets")  # once imported: its import sets its level
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # a parser's failure is said once, below
        try:
            part = datasets.load_dataset(kind, data_files={"rows": str(path)}, split="rows")
        except Exception as err:
            problem = _json_problem(raw, path) if kind == "json" else None
            raise DataError(problem or f"{path}: cannot be read as {'JSON' if kind == 'json' else kind}: "
                            f"{_reason(err)}") from None
        finally:
            quiet.setLevel(level)
    return table_of(part, str(path), locate, text_columns, label_column, hint)


def split_tables(dataset: Any, where: str, splits: Mapping[str, str], text_columns: tuple[str, ...],
                 label_column: str, hint: str = "") -> dict[str, Rows]:
    """Some of a dataset's splits as tables: ``splits`` maps crisp's name of each (``train``, then the
    validation splits) to the dataset's."""
    tables = {}
    for name, split in splits.items():
        if split not in dataset:
            key = "data.train_split" if name == "train" else "data.validation_split"
            raise DataError(f"{where}: {key}={split!r} is not allowed: its splits are {', '.join(map(str, dataset))}")
        place = f"{where}, split {split}"
        tables[name] = table_of(dataset[split], place, _indexed(place), text_columns, label_column, hint)
    return tables


def load_disk(folder: Path):
    """A ``DatasetDict.save_to_disk`` folder."""
    with datasets_offline() as datasets:
        try:
            return datasets.load_from_disk(str(folder))
        except Exception as err:
            raise DataError(f"{folder}: cannot be read as a save_to_disk folder: {_reason(err)}") from None
