"""Reading a study: every results.json below some folders, one record per run_key.

It reads results.json files and nothing else. A file that cannot be used (unreadable, another schema, a
completed run without its numbers) becomes a failed record that names it, so the report lists it.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from crisp.core import results
from crisp.core.results import COMPLETED, FAILED, FILENAME, SCHEMA_VERSION


class ReportError(Exception):
    """The dirs cannot make a report: one does not exist, or none holds a results.json."""


def collect(dirs: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """One record per run_key from every results.json below ``dirs``.

    A completed record beats a failed one; among equals the latest ``finished_at`` wins. Two completed
    records of one run_key whose numbers differ (the run trained twice: in lockstep and alone, say, where
    dropout draws differ) are said on the terminal, with both files and the one kept. A file that cannot
    be used becomes a failed record named by its directory (``unusable``). Each record gets ``results_path``.
    """
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise ReportError("no directories given")
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise ReportError(f"no such directory: {', '.join(missing)}")
    kept: dict[str, dict[str, Any]] = {}
    for path in results.find_all(*dirs):
        record = _load(path)
        # Unusable files have no run_key: each stands for itself (resolved, so overlapping dirs count once).
        key = record.get("run_key") or f"file:{path.resolve()}"
        if key in kept and _differ(record, kept[key]):
            _warn_two_results(record, kept[key])
        if key not in kept or _preference(record) > _preference(kept[key]):
            kept[key] = record
    return sorted(kept.values(), key=lambda r: r["results_path"])


def _differ(one: dict[str, Any], other: dict[str, Any]) -> bool:
    """Two completed results of one run whose numbers differ."""
    completed = one.get("status") == other.get("status") == COMPLETED
    return completed and any(one.get(k) != other.get(k) for k in ("final", "best", "history"))


def _warn_two_results(one: dict[str, Any], other: dict[str, Any]) -> None:
    kept, dropped = sorted((one, other), key=_preference, reverse=True)

    def said(record: dict[str, Any]) -> str:
        score = field_of(record, "final", metric_of(record))
        number = f"{metric_of(record)} {score:.4f}" if is_number(score) else "no final score"
        return f"{Path(record['results_path']).parent} ({number}, finished {record.get('finished_at')})"

    print(f"crisp.report: warning: run {kept.get('name')} (run_key {kept.get('run_key')}) has two different "
          f"completed results: {said(kept)} and {said(dropped)}; the report keeps the one that finished last, "
          f"{Path(kept['results_path']).parent}", file=sys.stderr)


def _load(path: Path) -> dict[str, Any]:
    record = results.read(path)
    problem = _problem(record)
    if problem is None:
        return {**record, "results_path": str(path)}
    known = record if isinstance(record, dict) else {}
    return {
        **known,
        "status": FAILED,
        "unusable": True,
        "name": known.get("name") or path.parent.name,
        "error": {"type": "UnusableResults", "message": f"{FILENAME} {problem}"},
        "results_path": str(path),
    }


def metric_of(record: Mapping[str, Any]) -> str:
    """The results key of the run's primary metric (results written before tasks had one: accuracy)."""
    return record.get("metric") or "val_acc"


def _problem(record: Any) -> str | None:
    """Why ``record`` cannot be used as it is, or None."""
    if record is None:
        return "cannot be read or parsed as JSON"
    if not isinstance(record, dict):
        return "is not a JSON object"
    if record.get("schema") != SCHEMA_VERSION:
        return f"schema {record.get('schema')!r}, expected {SCHEMA_VERSION}"
    if record.get("status") not in (COMPLETED, FAILED):
        return f"unknown status {record.get('status')!r}"
    usable = (
        isinstance(record.get("strategy"), str)
        and is_number(record.get("sparsity"))
        and isinstance(record.get("seed"), int)
        and is_number(field_of(record, "final", metric_of(record)))
    )
    if record["status"] == COMPLETED and not usable:
        return f"completed run without strategy, sparsity, seed or final.{metric_of(record)}"
    return None


def _preference(record: dict[str, Any]) -> tuple:
    # The path only breaks exact ties, so the choice does not depend on the order files are found in.
    return record.get("status") == COMPLETED, timestamp(record.get("finished_at")), record["results_path"]


def timestamp(value: Any) -> float:
    try:
        return datetime.fromisoformat(value).timestamp()
    except (TypeError, ValueError):
        return -math.inf


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def field_of(record: Mapping[str, Any], section: str, key: str) -> Any:
    part = record.get(section)
    return part.get(key) if isinstance(part, Mapping) else None


def number(value: Any) -> float:
    return float(value) if is_number(value) else math.nan


def portable_model(model: Any) -> Any:
    """A model named by a local folder (results written before models had labels) shows its folder's name."""
    return Path(model).name if isinstance(model, str) and os.path.isabs(model) else model
