"""The report as text: markdown tables (printed, and in report.md) and the whole report.md."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from crisp.core.results import COMPLETED
from crisp.report.collect import portable_model
from crisp.report.statistics import configuration, cross_task, title

PNG, TASKS_PNG = "report.png", "report-tasks.png"
DASH = "–"
_MAX_MESSAGE = 500
# the metrics a task may declare (crisp.core.data_config), as tables name them
METRIC_NAMES = {"val_acc": "accuracy", "val_mcc": "Matthews corr.", "val_f1": "F1", "val_pearson": "Pearson r",
                "val_spearman": "Spearman ρ", "val_kendall": "Kendall τ", "val_r2": "R²"}


def pct(metric: str) -> str:
    return f"{METRIC_NAMES.get(metric, metric.removeprefix('val_'))} (%)"


def format_table(summary: pd.DataFrame, heading: str = "") -> str:
    """Each table of the summary in markdown, as printed and as in report.md. The sparsifier and dropout
    columns show where a table has a row other than top-k with the model's own dropout."""
    parts = []
    for (task, data, model, setup), rows in summary.groupby(["task", "data", "model", "setup"], sort=False):
        metric = rows["metric"].iloc[0]
        extra = [c for c in ("sparsifier", "dropout") if any(rows[c].fillna("").map(_beyond_topk(c)))]
        header = [*extra, "strategy", "sparsity", "n", f"{pct(metric)} final", f"{pct(metric)} best",
                  "val loss final", "Δ vs dense (pp) [95% CI]", "pairs", "paper (%)", "failed"]
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for row in rows.itertuples(index=False):
            cells = [
                *(getattr(row, c) or DASH for c in extra),
                row.strategy, DASH if row.strategy == "none" else f"{row.sparsity:g}", str(row.n),
                _mean_std(row.final_mean, row.final_std), _mean_std(row.best_mean, row.best_std),
                _fmt(row.val_loss_final_mean, ".4f"), _diff(row.diff_vs_dense_mean, row.diff_ci_low, row.diff_ci_high),
                _fmt(row.n_pairs, "d"), _fmt(row.paper, ".2f"), str(row.failed),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append((f"{heading}{title(task, data, model, setup)}\n\n" if heading else "") + "\n".join(lines))
    return "\n\n".join(parts)


def _beyond_topk(column: str):
    """Whether a value of ``column`` says more than a top-k table always says (top-k, the model's own dropout)."""
    return (lambda v: v not in ("", "topk")) if column == "sparsifier" else bool


def format_cross_task(rows: pd.DataFrame) -> str:
    """Configurations × tasks: each cell the paired Δ against dense [95% CI], ✱ where it excludes 0."""
    tasks = list(dict.fromkeys(rows["task"]))
    metrics = {task: rows[rows["task"] == task]["metric"].iloc[0] for task in tasks}
    header = ["configuration", *(f"{t} ({METRIC_NAMES.get(metrics[t], metrics[t])})" for t in tasks)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(tasks)]
    labelled = rows.assign(configuration=[configuration(r) for r in rows.itertuples(index=False)])
    for label, config in labelled.groupby("configuration", sort=True):
        cells = [label]
        for task in tasks:
            found = config[config["task"] == task]
            if found.empty:
                cells.append(DASH)
                continue
            row = found.iloc[0]
            mark = " ✱" if pd.notna(row.diff_ci_low) and (row.diff_ci_low > 0 or row.diff_ci_high < 0) else ""
            cells.append(_diff(row.diff_vs_dense_mean, row.diff_ci_low, row.diff_ci_high) + mark)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_all(summary: pd.DataFrame) -> str:
    """Every table, then the cross-task tables: what the terminal shows of a report."""
    parts = [format_table(summary, heading="## ")]
    for (model, setup), rows in cross_task(summary).items():
        parts.append(f"## {' · '.join(p for p in ('Across tasks', model, setup) if p)}\n\n{format_cross_task(rows)}")
    return "\n\n".join(parts)


def _fmt(value: Any, spec: str) -> str:
    return DASH if pd.isna(value) else format(value, spec)


def _mean_std(mean: float, std: float) -> str:
    return DASH if pd.isna(mean) else f"{mean:.2f} ± {_fmt(std, '.2f')}"


def _diff(mean: float, low: float, high: float) -> str:
    if pd.isna(mean):
        return DASH
    interval = DASH if pd.isna(low) else f"{low:+.2f}, {high:+.2f}"
    return f"{mean:+.2f} [{interval}]"


def markdown(dirs: Iterable[str | os.PathLike], records: list[dict[str, Any]], summary: pd.DataFrame,
             out: str | os.PathLike = ".") -> str:
    """The whole report.md, written into ``out``: paths in it are relative to ``out``, never a machine's."""
    completed = [r for r in records if r.get("status") == COMPLETED]
    failed = [r for r in records if r.get("status") != COMPLETED]
    setups = sorted({f"{portable_model(r.get('model'))}{_trained(r)} on {r.get('data')}" for r in completed})
    where = [portable_path(d, out) for d in dirs]
    parts = [
        "# crisp ablation: top-k attention sparsity",
        "Read from:\n" + "\n".join(f"- `{w}`" if w != "." else f"- `{Path(out).resolve().name}` (this folder)"
                                   for w in where),
        f"Runs (one per run_key): **{len(completed)} completed**, **{len(failed)} failed**."
        + (f" Model: {', '.join(setups)}." if setups else ""),
        format_table(summary, heading="## ") if len(summary) else "No run names a strategy and sparsity.",
        "Each table pools runs that differ only in seed, strategy and sparsity; its metric is the task's primary "
        "one, in %: mean ± sample std over seeds (– with fewer than two). Δ: paired difference vs the table's "
        "dense row in percentage points over the seeds completed in both, with a 95% t interval. "
        "Paper: the figure the paper reports (SST-2).",
        f"![Each table's metric vs sparsity]({PNG})",
    ]
    for (model, setup), rows in cross_task(summary).items():
        title = " · ".join(p for p in ("Across tasks", model, setup) if p)
        parts += [f"## {title}", format_cross_task(rows),
                  "Each cell: the configuration's paired Δ against dense in that task's primary metric (pp), "
                  "95% t interval; ✱ where the interval excludes 0.", f"![Δ vs dense across tasks]({TASKS_PNG})"]
    parts.append("## Failed runs\n\n" + ("\n".join(_failure_line(r, out) for r in failed) if failed else "None."))
    return "\n\n".join(parts) + "\n"


def _trained(record: dict[str, Any]) -> str:
    """`` (the class and source of the model that trained)``, where results.json names it."""
    trained = record.get("trained_model")
    return f" ({trained['label']})" if isinstance(trained, Mapping) and trained.get("label") else ""


def portable_path(path: str | os.PathLike, out: str | os.PathLike) -> str:
    """``path`` relative to the report's folder when inside it, else just its last part."""
    path, out = Path(path).resolve(), Path(out).resolve()
    return str(path.relative_to(out)) if path.is_relative_to(out) else f".../{path.name}"


def _failure_line(record: dict[str, Any], out: str | os.PathLike) -> str:
    error = record.get("error")
    error = error if isinstance(error, Mapping) else {"message": error}
    message = " ".join(str(error.get("message") or "no message").split())  # one line per run
    message = message.replace(f"{Path(out).resolve()}{os.sep}", "")
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 1] + "…"
    where = portable_path(Path(record["results_path"]).parent, out)
    return f"- `{record.get('name')}` (`{where}`): {error.get('type') or 'unknown error'}: {message}"
