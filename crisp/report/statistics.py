"""The statistics of a study: its runs split into tables, one row per configuration, paired against dense.

Runs are pooled only when they differ in nothing but their seed, strategy and sparsity: one table per
(task, model, recipe), titled by the task, the model and, where several recipes share them, the keys that
tell the recipes apart (``optim.lr=5e-05``). A table has one row per (strategy, sparsity) in the task's
primary metric (in percent or percentage points): mean ± sample std over seeds (final epoch and best
epoch), validation loss, and the paired difference against the dense row of the same table over the seeds
completed in both, with a 95% t confidence interval. Where one recipe ran on several tasks,
:func:`cross_task` gives each configuration's paired difference per task.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from scipy import stats

from crisp.core import results
from crisp.core.data_config import without_preset_declaration
from crisp.core.results import COMPLETED
from crisp.report.collect import field_of, is_number, number, portable_model, timestamp

DENSE = ("dense", 0.0)
# the reference row of every table: dense, the model's own dropout (any sparsifier at sparsity 0 is dense)
DENSE_CELL = ("", "", *DENSE)
# Validation accuracy (%) the paper reports on SST-2, by (strategy, sparsity).
PAPER_VAL_ACC: dict[tuple[str, float], float] = {("dense", 0.0): 90.62, ("uniform", 0.8): 91.59}
TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
# what a run varies within a table, and what says how it was launched or watched: no part of a recipe
NOT_A_RECIPE = (*results.VARIES_WITHIN_STUDY, *results.NOT_IN_KEY, "sparsifier", "dropout")
# what tells a table's rows apart: its configuration (see _cells)
CELL = ["sparsifier", "dropout", "strategy", "sparsity"]
COLUMNS = [
    "task", "data", "model", "setup", "metric", "sparsifier", "dropout", "strategy", "sparsity", "n", "failed",
    "final_mean", "final_std", "best_mean", "best_std", "val_loss_final_mean",
    "diff_vs_dense_mean", "diff_ci_low", "diff_ci_high", "n_pairs", "paper",
]


@dataclass
class Table:
    """The runs of one (task, model, recipe): they differ in seed, strategy and sparsity only."""

    task: str
    data: str
    model: str
    recipe: dict[str, Any]  # the flattened config without what a run varies
    records: list[dict[str, Any]]
    setup: str = ""  # the keys that tell this recipe from the others of its task and model

    @property
    def metric(self) -> str:
        """The task's primary metric: as its completed runs recorded it, else as any of its runs did from the
        start (a table of runs that all failed), else accuracy (results written before runs said)."""
        for records in ([r for r in self.records if r.get("status") == COMPLETED], self.records):
            if found := next((r["metric"] for r in records if isinstance(r.get("metric"), str)), None):
                return found
        return "val_acc"



def title(task: str, data: str, model: str, setup: str) -> str:
    """``rte · model · setup``; data that is not the task's own files names itself: ``sst2 (synthetic)``."""
    named = task if data in (task, f"{task}_local") else f"{task} ({data})"
    return " · ".join(p for p in (named, model, setup) if p)


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, Mapping):
        return {prefix.rstrip("."): config}
    flat = {}
    for key, value in config.items():
        flat |= _flat(value, f"{prefix}{key}.")
    return flat


def recipe_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    config = record.get("config") if isinstance(record.get("config"), Mapping) else {}
    if isinstance(config.get("data"), dict):  # a GLUE task's own declaration tells no recipe apart
        config = {**config, "data": without_preset_declaration(config["data"])}
    recipe = {k: v for k, v in _flat(config).items() if k.split(".")[0] not in NOT_A_RECIPE}
    recipe["model"], recipe["task"] = portable_model(record.get("model")), record.get("task") or "sst2"
    recipe.pop("model.label", None)  # a display name
    return recipe


def tables(records: Iterable[dict[str, Any]]) -> list[Table]:
    """The records that name a strategy and sparsity, split into tables (see the module)."""
    groups: dict[str, Table] = {}
    for record in records:
        if not isinstance(record.get("strategy"), str) or not is_number(record.get("sparsity")):
            continue  # unusable files: listed as failed runs, in no table
        recipe = recipe_settings(record)
        # the recipe as written (results.json's "recipe"), or, for results written before it, the config as run
        key = json.dumps([recipe["task"], recipe["model"], record.get("recipe") or recipe], sort_keys=True, default=str)
        if key not in groups:
            groups[key] = Table(recipe["task"], str(record.get("data")), recipe["model"], recipe, [])
        table = groups[key]
        table.records.append(record)
        # what differs within the recipe (a value derived from the seed) says nothing about it
        table.recipe = {k: v for k, v in table.recipe.items() if recipe.get(k, v) == v}
    found = list(groups.values())
    for table in found:  # name a recipe by what sets it apart from the others of its task and model
        peers = [t.recipe for t in found if (t.task, t.model) == (table.task, table.model)]
        common = set.intersection(*(set(r) for r in peers))  # a key that varies within some recipe names none
        keys = sorted(k for k in common if any(r[k] != table.recipe[k] for r in peers))
        table.setup = ", ".join(f"{k}={table.recipe.get(k)}" for k in keys)
    order = {task: i for i, task in enumerate(TASK_ORDER)}
    return sorted(found, key=lambda t: (order.get(t.task, len(order)), t.task, str(t.model), t.setup))


def summarize(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Every table's rows, dense first in each (metrics in %, differences in percentage points)."""
    frames = [_summarize(table) for table in tables(records)]
    frames = [f for f in frames if not f.empty]
    summary = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    return summary.astype({"n": int, "failed": int, "n_pairs": "Int64"})


def _summarize(table: Table) -> pd.DataFrame:
    runs = _runs_frame(table.records, table.metric)
    done = _one_per_seed(runs[runs["completed"]], title(table.task, table.data, table.model, table.setup))
    dense = _by_seed(done, DENSE_CELL)
    rows = []
    for cell in sorted(set(runs[CELL].itertuples(index=False, name=None)), key=_row_order):
        group = runs[in_cell(runs, cell)]
        completed = done[in_cell(done, cell)]
        sparsifier, dropout, strategy, sparsity = cell
        rows.append({
            "task": table.task, "data": table.data, "model": portable_model(table.model), "setup": table.setup,
            "metric": table.metric,
            "sparsifier": sparsifier,
            "dropout": dropout,
            "strategy": strategy,
            "sparsity": sparsity,
            "n": len(completed),
            "failed": int((~group["completed"]).sum()),
            "final_mean": completed["final"].mean(),
            "final_std": completed["final"].std(ddof=1),
            "best_mean": completed["best"].mean(),
            "best_std": completed["best"].std(ddof=1),
            "val_loss_final_mean": completed["loss_final"].mean(),
            # The dense row is the reference: no difference with itself.
            **(_no_pairs() if cell == DENSE_CELL else _paired(_by_seed(done, cell), dense)),
            "paper": _paper(table, cell),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def _paper(table: Table, cell: tuple) -> float:
    """The paper's figure for this row (SST-2's own data, top-k or dense, the model's own dropout)."""
    sparsifier, dropout, strategy, sparsity = cell
    if table.task != "sst2" or table.data not in ("sst2", "sst2_local") or dropout or sparsifier not in ("", "topk"):
        return math.nan
    return PAPER_VAL_ACC.get((strategy, sparsity), math.nan)


def _sparsifier(record: Mapping[str, Any]) -> dict[str, Any] | None:
    config = record.get("config") if isinstance(record.get("config"), Mapping) else {}
    return config.get("sparsifier")


def _dropout_label(record: Mapping[str, Any]) -> str:
    """``attention=0.8``: the dropout probabilities a run set (results before that key: from its config)."""
    dropout = record.get("dropout")
    if not isinstance(dropout, Mapping):
        config = record.get("config") if isinstance(record.get("config"), Mapping) else {}
        dropout = {k: v for k, v in (config.get("dropout") or {}).items() if v is not None}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(dropout.items()))


def _cells(record: Mapping[str, Any], sparsity: float) -> dict[str, Any]:
    """A run's configuration: its sparsifier (none for a dense run: every sparsifier at sparsity 0 is the
    same run), the dropout it set, its strategy and sparsity."""
    sparsifier = _sparsifier(record)
    strategy = results.effective_strategy(record["strategy"], sparsity, sparsifier)
    label = record.get("sparsifier") or results.sparsifier_label(sparsifier)
    return {"sparsifier": "" if strategy == "dense" else label, "dropout": _dropout_label(record),
            "strategy": strategy, "sparsity": sparsity}


def _runs_frame(records: Iterable[dict[str, Any]], metric: str) -> pd.DataFrame:
    rows = []
    for record in records:
        sparsity = round(float(record["sparsity"]), 6)  # 0.6 and 0.6000000001 are one row
        rows.append({
            **_cells(record, sparsity),
            "seed": record.get("seed"),
            "completed": record.get("status") == COMPLETED,
            "final": 100 * number(field_of(record, "final", metric)),
            "best": 100 * number(field_of(record, "best", metric)),
            "loss_final": number(field_of(record, "final", "val_loss")),
            "finished": timestamp(record.get("finished_at")),
        })
    columns = [*CELL, "seed", "completed", "final", "best", "loss_final", "finished"]
    return pd.DataFrame(rows, columns=columns).astype({"completed": bool})


def _one_per_seed(done: pd.DataFrame, title: str) -> pd.DataFrame:
    """Completed runs, one per (configuration, seed): pairing and std assume one value per seed."""
    cell = [*CELL, "seed"]
    repeated = done[done.duplicated(cell, keep=False)]
    if not repeated.empty:
        # Different run_keys of one recipe and cell: a key outside the recipe (how it ran) changed: keep the latest.
        cells = sorted({tuple(r) for r in repeated[["strategy", "sparsity", "seed"]].itertuples(index=False)})
        print(f"crisp.report: {title}: several completed runs for (strategy, sparsity, seed) {cells}; "
              "keeping the latest", file=sys.stderr)
    return done.sort_values("finished", kind="stable").drop_duplicates(cell, keep="last")


def in_cell(frame: pd.DataFrame, cell: tuple) -> pd.Series:
    inside = pd.Series(True, index=frame.index)
    for column, value in zip(CELL, cell, strict=True):
        inside &= frame[column] == value
    return inside


def _by_seed(done: pd.DataFrame, cell: tuple) -> pd.Series:
    return done[in_cell(done, cell)].set_index("seed")["final"]


def _paired(score: pd.Series, dense: pd.Series) -> dict[str, float]:
    """Mean difference vs dense over the seeds in both, with a 95% t interval (needs two pairs)."""
    diffs = (score - dense).dropna()  # aligned on seed: a seed missing on either side is not a pair
    n = len(diffs)
    if n == 0:
        return {**_no_pairs(), "n_pairs": 0}
    mean = diffs.mean()
    half = stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
    return {"diff_vs_dense_mean": mean, "diff_ci_low": mean - half, "diff_ci_high": mean + half, "n_pairs": n}


def _no_pairs() -> dict[str, float]:
    return {"diff_vs_dense_mean": math.nan, "diff_ci_low": math.nan, "diff_ci_high": math.nan, "n_pairs": math.nan}


def _row_order(cell: tuple) -> tuple:
    """Dense first, then top-k's rows by strategy and sparsity (as before sparsifiers had a choice), then the others."""
    sparsifier, dropout, strategy, sparsity = cell
    return cell != DENSE_CELL, dropout, sparsifier not in ("", "topk"), sparsifier, strategy, sparsity


def configuration(row: Any) -> str:
    """A row's configuration in words: ``uniform 0.8``, ``random uniform 0.8``, ``entmax alpha=1.5``,
    ``dense + dropout attention=0.8``."""
    parts = [] if row.sparsifier in ("", "topk") else [row.sparsifier]
    if row.strategy != "none":
        parts.append(row.strategy if row.strategy == "dense" else f"{row.strategy} {row.sparsity:g}")
    label = " ".join(parts)
    return f"{label} + dropout {row.dropout}" if row.dropout else label


def cross_task(summary: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """Per (model, setup) run on two tasks or more: configurations × tasks, each cell its paired Δ row."""
    found = {}
    for (model, setup), rows in summary.groupby(["model", "setup"], sort=False):
        if rows["task"].nunique() > 1:
            found[(model, setup)] = rows[~in_cell(rows, DENSE_CELL)]
    return found
