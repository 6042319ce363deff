"""Every row of every source checked the same way, before anything trains.

A source reads its rows into a :class:`Rows` (the text and label columns as read, and where each row
is); :func:`to_split` checks each row against the task and makes a :class:`Split`. A bad row stops the
load with one line: its place (``train.csv:12``, ``train.parquet, row 11``), the value, what is allowed,
and its column. Label names the task leaves undeclared are read from the training table
(:func:`label_names`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from crisp.core.errors import DataError
from crisp.training.tasks import Task


@dataclass
class Split:
    texts: list[str]
    labels: list[int] | list[float]
    pairs: list[str] | None = None  # the second sentence of each example, for pair tasks


@dataclass
class Rows:
    """One file's or split's text and label columns as read, before their rows are checked."""

    where: str  # the file, or the dataset and its split
    texts: list[list[Any]]  # one column per text field
    labels: list[Any]
    text_columns: tuple[str | int, ...]  # the columns' names (or positions), for the messages
    label_column: str | int
    locate: Callable[[int], str]  # a row's place: "train.csv:12", "train.parquet, row 11"
    class_names: tuple[str, ...] | None = None  # a label column of class ids (a ClassLabel): its names

    def __len__(self) -> int:
        return len(self.labels)


def _either(names: tuple[str, ...]) -> str:
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def _as_name(value: Any) -> str | None:
    """A label value as a class name (None: it cannot be one)."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def _integer(name: str) -> bool:
    return name.lstrip("-").isdigit()


def _number(name: str) -> bool:
    try:
        return math.isfinite(float(name))
    except ValueError:
        return False


def label_names(table: Rows) -> tuple[str, ...]:
    """The class names of a training table whose task declares none: a ClassLabel column's own, else its
    values sorted (numerically when all are integers)."""
    _require_rows(table)
    if table.class_names:
        return table.class_names
    names = set()
    for i, value in enumerate(table.labels):
        name = _as_name(value)
        if name is None:
            allowed = ("a class name; a score needs data.regression=[low,high]" if isinstance(value, float)
                       else "a class name, not empty")
            raise DataError(f"{table.locate(i)}: label={value!r} is not allowed: {allowed} "
                            f"(column {table.label_column!r})")
        names.add(name)
    ordered = tuple(sorted(names, key=int) if all(map(_integer, names)) else sorted(names))
    scores = [n for n in ordered if _number(n) and not _integer(n)]
    if scores and all(map(_number, ordered)):
        raise DataError(f"{table.where}: the labels (column {table.label_column!r}) are numbers such as "
                        f"{scores[0]!r}, not class names: a score needs data.regression=[low,high] (data.labels "
                        "declares class names)")
    if len(ordered) < 2:
        raise DataError(f"{table.where}: the labels (column {table.label_column!r}) hold one value, {ordered[0]!r}: "
                        "a classification needs two classes or more (a score needs data.regression=[low,high])")
    return ordered


def _require_rows(table: Rows) -> None:
    if not len(table):
        raise DataError(f"{table.where}: no examples (the split is empty): it needs one example a row or line")


def _class_id(table: Rows, i: int, names: tuple[str, ...], index: dict[str, int], read: str | None) -> int:
    """A row's class id. A label is a class name; an integer is a class id where the names are not integers
    (HF's convention) and, in a ClassLabel column, stands for its own name, or for the id itself where the
    task names the same classes otherwise (GLUE's 0/1 for the hub's unacceptable/acceptable)."""
    value = table.labels[i]
    whole = isinstance(value, int) and not isinstance(value, bool)
    if whole and table.class_names is not None:
        own = table.class_names[value] if 0 <= value < len(table.class_names) else None
        if own in index:
            return index[own]
        if not set(table.class_names) & set(names) and 0 <= value < len(names):
            return value
    elif whole and not all(map(_integer, names)) and 0 <= value < len(names):
        return value
    found = index.get(_as_name(value))
    if found is None:
        whose = f", those of {read}, or declared in data.labels" if read else ""
        raise DataError(f"{table.locate(i)}: label={value!r} is not allowed: labels must be {_either(names)}{whose} "
                        f"(column {table.label_column!r})")
    return found


def _score(table: Rows, i: int, low: float, high: float) -> float:
    value = table.labels[i]
    try:
        score = float(value) if not isinstance(value, bool) and value is not None else math.nan
    except (TypeError, ValueError):
        score = math.nan
    if not (math.isfinite(score) and low <= score <= high):
        raise DataError(f"{table.locate(i)}: label={value!r} is not allowed: it must be a number in "
                        f"[{low:g}, {high:g}] (data.regression; column {table.label_column!r})")
    return score


def _text(table: Rows, column: int, i: int) -> str:
    value = table.texts[column][i]
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        allowed = "every example needs its text" if value is None or isinstance(value, str) else "it must be a string"
        raise DataError(f"{table.locate(i)}: text={value!r} is not allowed: {allowed} "
                        f"(column {table.text_columns[column]!r})")
    return text


def to_split(table: Rows, task: Task, labels_from: str | None = None) -> Split:
    """The table's rows as examples of ``task`` (its labels known), each row checked (see the module).
    ``labels_from``: the training split the label names were read from, which the messages name."""
    _require_rows(table)
    texts = [[_text(table, c, i) for i in range(len(table))] for c in range(len(table.texts))]
    if task.regression:
        labels = [_score(table, i, *task.target_range) for i in range(len(table))]
    else:
        names = task.labels
        index = {name: k for k, name in enumerate(names)}
        labels = [_class_id(table, i, names, index, labels_from) for i in range(len(table))]
    return Split(texts[0], labels, texts[1] if task.pair else None)
