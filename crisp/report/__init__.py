"""The ablation report of a study: what ``python -m crisp.report DIR [DIR ...]`` and a sweep's end write.

:mod:`~crisp.report.collect` reads every results.json below the dirs (one record per run_key),
:mod:`~crisp.report.statistics` splits them into tables and pairs each configuration against dense,
:mod:`~crisp.report.render` writes the markdown and :mod:`~crisp.report.plot` the pictures. Writes
``report.md``, ``report.csv``, ``report.png`` (and ``report-tasks.png`` across tasks) into the first dir
(or ``--out``). It reads results.json files and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from crisp.core import results
from crisp.core.results import FILENAME
from crisp.report.collect import ReportError, collect
from crisp.report.plot import plot, plot_cross_task
from crisp.report.render import PNG, TASKS_PNG, format_all, format_cross_task, format_table, markdown
from crisp.report.statistics import COLUMNS, cross_task, summarize

MARKDOWN, CSV = "report.md", "report.csv"
__all__ = ["COLUMNS", "CSV", "MARKDOWN", "PNG", "TASKS_PNG", "ReportError", "collect", "cross_task", "format_all",
           "format_cross_task", "format_table", "summarize", "write_report"]


def write_report(
    dirs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    log_wandb: Mapping[str, Any] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> pd.DataFrame:
    """Write report.md, report.csv and report.png (and report-tasks.png) into ``out_dir`` (default: the
    first dir); return the summary.

    ``log_wandb``: ``wandb.init`` kwargs; when given, the report is logged to a W&B run of its own (``_log_wandb``).
    ``records``: what :func:`collect` read of ``dirs``, when the caller has read it already.
    Raises :class:`ReportError`, writing nothing, when a dir does not exist or none holds results.
    """
    dirs = [Path(d) for d in dirs]
    records = collect(dirs) if records is None else records
    if not records:
        raise ReportError(f"no {FILENAME} found under: {', '.join(map(str, dirs))}")
    summary = summarize(records)
    out = Path(out_dir) if out_dir is not None else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    across = cross_task(summary)
    # The markdown comes last, so the images it links to are already there.
    results.write_atomic(out / PNG, plot(summary))
    if across:
        results.write_atomic(out / TASKS_PNG, plot_cross_task(across))
    results.write_atomic(out / CSV, summary.to_csv(index=False).encode())
    results.write_atomic(out / MARKDOWN, markdown(dirs, records, summary, out).encode())
    if log_wandb is not None:
        _log_wandb(summary, log_wandb, out)
    return summary


# the paired comparison against dense: what answers the study's question, as its own W&B table
DELTA_COLUMNS = ["task", "model", "setup", "metric", "strategy", "sparsity", "n_pairs", "diff_vs_dense_mean",
                 "diff_ci_low", "diff_ci_high"]


def _table(frame: pd.DataFrame):
    import wandb

    return wandb.Table(dataframe=frame.astype(object).where(frame.notna(), None))  # W&B takes None, not NaN


def _log_wandb(summary: pd.DataFrame, init_kwargs: Mapping[str, Any], out: Path) -> None:
    """The report as a W&B run (job_type ``report``; the sweep's id in its tags and config when the sweep
    passes it): the whole table ("report"), the paired Δ against dense ("paired_delta": the rows that have
    one), and the plots as images ("plot", "plot_tasks")."""
    import wandb  # only when asked: importing it is slow

    try:
        run = wandb.init(**{**init_kwargs, "job_type": "report"})
        paired = summary[summary["n_pairs"].fillna(0) > 0][[c for c in DELTA_COLUMNS if c in summary]]
        media = {"report": _table(summary), "paired_delta": _table(paired)}
        for key, name in (("plot", PNG), ("plot_tasks", TASKS_PNG)):
            if (out / name).is_file():
                media[key] = wandb.Image(str(out / name))
        run.log(media)
    finally:
        wandb.finish()
