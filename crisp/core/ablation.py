"""The ablation tables of a study: what ``python -m crisp.report DIR [DIR ...]`` and a sweep's end write.

Reads every results.json below the dirs and keeps one record per run_key. Runs are pooled only when
they differ in nothing but their seed, strategy and sparsity: one table per (task, model, recipe),
titled by the task, the model and, where several recipes share them, the keys that tell the recipes
apart (``optim.lr=5e-05``). A table has one row per (strategy, sparsity) in the task's primary metric
(accuracy, Matthews correlation, F1, Pearson; in percent or percentage points): mean ± sample std over
seeds (final epoch and best epoch), validation loss, and the paired difference against the dense row
of the same table over the seeds completed in both, with a 95% t confidence interval. Where one recipe
ran on several tasks, a cross-task table gives each configuration's paired difference per task.

Writes ``report.md``, ``report.csv``, ``report.png`` (and ``report-tasks.png`` across tasks) into the
first dir (or ``--out``). It reads results.json files and nothing else.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from crisp.core import results
from crisp.core.results import COMPLETED, FAILED, FILENAME, SCHEMA_VERSION

DENSE = ("dense", 0.0)
# Validation accuracy (%) the paper reports on SST-2, by (strategy, sparsity).
PAPER_VAL_ACC: dict[tuple[str, float], float] = {("dense", 0.0): 90.62, ("uniform", 0.8): 91.59}
TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
# what a run varies within a table, and what says how it was launched or watched: no part of a recipe
NOT_A_RECIPE = (*results.PER_RUN, *results.NOT_IN_KEY)

MARKDOWN, CSV, PNG, TASKS_PNG = "report.md", "report.csv", "report.png", "report-tasks.png"
COLUMNS = [
    "task", "data", "model", "setup", "metric", "strategy", "sparsity", "n", "failed",
    "final_mean", "final_std", "best_mean", "best_std", "val_loss_final_mean",
    "diff_vs_dense_mean", "diff_ci_low", "diff_ci_high", "n_pairs", "paper",
]
DASH = "–"
_MAX_MESSAGE = 500
METRIC_NAMES = {"val_acc": "accuracy", "val_mcc": "Matthews corr.", "val_f1": "F1", "val_pearson": "Pearson r",
                "val_spearman": "Spearman ρ"}


class ReportError(Exception):
    """The dirs cannot make a report: one does not exist, or none holds a results.json."""


# ---------------------------------------------------------------------------------------------- reading


def collect(dirs: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """One record per run_key from every results.json below ``dirs``.

    A completed record beats a failed one; among equals the latest ``finished_at`` wins. A file that
    cannot be used becomes a failed record named by its directory (``unusable``). Each record gets
    ``results_path``.
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
        if key not in kept or _preference(record) > _preference(kept[key]):
            kept[key] = record
    return sorted(kept.values(), key=lambda r: r["results_path"])


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
        and _is_number(record.get("sparsity"))
        and isinstance(record.get("seed"), int)
        and _is_number(_get(record, "final", metric_of(record)))
    )
    if record["status"] == COMPLETED and not usable:
        return f"completed run without strategy, sparsity, seed or final.{metric_of(record)}"
    return None


def _preference(record: dict[str, Any]) -> tuple:
    # The path only breaks exact ties, so the choice does not depend on the order files are found in.
    return record.get("status") == COMPLETED, _timestamp(record.get("finished_at")), record["results_path"]


def _timestamp(value: Any) -> float:
    try:
        return datetime.fromisoformat(value).timestamp()
    except (TypeError, ValueError):
        return -math.inf


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _get(record: Mapping[str, Any], section: str, key: str) -> Any:
    part = record.get(section)
    return part.get(key) if isinstance(part, Mapping) else None


def _number(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan


# ---------------------------------------------------------------------------------------------- tables


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
        return next((metric_of(r) for r in self.records if r.get("status") == COMPLETED), "val_acc")



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


def recipe_of(record: Mapping[str, Any]) -> dict[str, Any]:
    config = record.get("config") if isinstance(record.get("config"), Mapping) else {}
    recipe = {k: v for k, v in _flat(config).items() if k.split(".")[0] not in NOT_A_RECIPE}
    recipe["model"], recipe["task"] = portable_model(record.get("model")), record.get("task") or "sst2"
    recipe.pop("model.label", None)  # a display name
    return recipe


def tables(records: Iterable[dict[str, Any]]) -> list[Table]:
    """The records that name a strategy and sparsity, split into tables (see the module)."""
    groups: dict[str, Table] = {}
    for record in records:
        if not isinstance(record.get("strategy"), str) or not _is_number(record.get("sparsity")):
            continue  # unusable files: listed as failed runs, in no table
        recipe = recipe_of(record)
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
    dense = _by_seed(done, *DENSE)
    rows = []
    for strategy, sparsity in sorted(set(zip(runs["strategy"], runs["sparsity"], strict=True)), key=_row_order):
        group = runs[(runs["strategy"] == strategy) & (runs["sparsity"] == sparsity)]
        completed = done[(done["strategy"] == strategy) & (done["sparsity"] == sparsity)]
        is_dense = (strategy, sparsity) == DENSE
        rows.append({
            "task": table.task, "data": table.data, "model": portable_model(table.model), "setup": table.setup,
            "metric": table.metric,
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
            **(_no_pairs() if is_dense else _paired(_by_seed(done, strategy, sparsity), dense)),
            "paper": PAPER_VAL_ACC.get((strategy, sparsity), math.nan) if table.task == "sst2" else math.nan,
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def _runs_frame(records: Iterable[dict[str, Any]], metric: str) -> pd.DataFrame:
    rows = []
    for record in records:
        sparsity = round(float(record["sparsity"]), 6)  # 0.6 and 0.6000000001 are one row
        rows.append({
            "strategy": results.effective_strategy(record["strategy"], sparsity),
            "sparsity": sparsity,
            "seed": record.get("seed"),
            "completed": record.get("status") == COMPLETED,
            "final": 100 * _number(_get(record, "final", metric)),
            "best": 100 * _number(_get(record, "best", metric)),
            "loss_final": _number(_get(record, "final", "val_loss")),
            "finished": _timestamp(record.get("finished_at")),
        })
    columns = ["strategy", "sparsity", "seed", "completed", "final", "best", "loss_final", "finished"]
    return pd.DataFrame(rows, columns=columns).astype({"completed": bool})


def _one_per_seed(done: pd.DataFrame, title: str) -> pd.DataFrame:
    """Completed runs, one per (strategy, sparsity, seed): pairing and std assume one value per seed."""
    cell = ["strategy", "sparsity", "seed"]
    repeated = done[done.duplicated(cell, keep=False)]
    if not repeated.empty:
        # Different run_keys of one recipe and cell: a key outside the recipe (how it ran) changed: keep the latest.
        cells = sorted({tuple(r) for r in repeated[cell].itertuples(index=False)})
        print(f"crisp.report: {title}: several completed runs for (strategy, sparsity, seed) {cells}; "
              "keeping the latest", file=sys.stderr)
    return done.sort_values("finished", kind="stable").drop_duplicates(cell, keep="last")


def _by_seed(done: pd.DataFrame, strategy: str, sparsity: float) -> pd.Series:
    rows = done[(done["strategy"] == strategy) & (done["sparsity"] == sparsity)]
    return rows.set_index("seed")["final"]


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


def _row_order(cell: tuple[str, float]) -> tuple:
    return cell != DENSE, cell[0], cell[1]


def cross_task(summary: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """Per (model, setup) run on two tasks or more: configurations × tasks, each cell its paired Δ row."""
    found = {}
    for (model, setup), rows in summary.groupby(["model", "setup"], sort=False):
        if rows["task"].nunique() > 1:
            found[(model, setup)] = rows[~((rows["strategy"] == DENSE[0]) & (rows["sparsity"] == DENSE[1]))]
    return found


# ---------------------------------------------------------------------------------------------- markdown


def _pct(metric: str) -> str:
    return f"{METRIC_NAMES.get(metric, metric.removeprefix('val_'))} (%)"


def format_table(summary: pd.DataFrame, heading: str = "") -> str:
    """Each table of the summary in markdown, as printed and as in report.md."""
    parts = []
    for (task, data, model, setup), rows in summary.groupby(["task", "data", "model", "setup"], sort=False):
        metric = rows["metric"].iloc[0]
        header = ["strategy", "sparsity", "n", f"{_pct(metric)} final", f"{_pct(metric)} best", "val loss final",
                  "Δ vs dense (pp) [95% CI]", "pairs", "paper (%)", "failed"]
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for row in rows.itertuples(index=False):
            cells = [
                row.strategy, f"{row.sparsity:g}", str(row.n),
                _mean_std(row.final_mean, row.final_std), _mean_std(row.best_mean, row.best_std),
                _fmt(row.val_loss_final_mean, ".4f"), _diff(row.diff_vs_dense_mean, row.diff_ci_low, row.diff_ci_high),
                _fmt(row.n_pairs, "d"), _fmt(row.paper, ".2f"), str(row.failed),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append((f"{heading}{title(task, data, model, setup)}\n\n" if heading else "") + "\n".join(lines))
    return "\n\n".join(parts)


def format_cross_task(rows: pd.DataFrame) -> str:
    """Configurations × tasks: each cell the paired Δ against dense [95% CI], ✱ where it excludes 0."""
    tasks = list(dict.fromkeys(rows["task"]))
    metrics = {task: rows[rows["task"] == task]["metric"].iloc[0] for task in tasks}
    header = ["configuration", *(f"{t} ({METRIC_NAMES.get(metrics[t], metrics[t])})" for t in tasks)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(tasks)]
    for (strategy, sparsity), config in rows.groupby(["strategy", "sparsity"], sort=True):
        cells = [f"{strategy} {sparsity:g}"]
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
    setups = sorted({f"{portable_model(r.get('model'))} on {r.get('data')}" for r in completed})
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


def portable_path(path: str | os.PathLike, out: str | os.PathLike) -> str:
    """``path`` relative to the report's folder when inside it, else just its last part."""
    path, out = Path(path).resolve(), Path(out).resolve()
    return str(path.relative_to(out)) if path.is_relative_to(out) else f".../{path.name}"


def portable_model(model: Any) -> Any:
    """A model named by a local folder (results written before models had labels) shows its folder's name."""
    return Path(model).name if isinstance(model, str) and os.path.isabs(model) else model


def _failure_line(record: dict[str, Any], out: str | os.PathLike) -> str:
    error = record.get("error")
    error = error if isinstance(error, Mapping) else {"message": error}
    message = " ".join(str(error.get("message") or "no message").split())  # one line per run
    message = message.replace(f"{Path(out).resolve()}{os.sep}", "")
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 1] + "…"
    where = portable_path(Path(record["results_path"]).parent, out)
    return f"- `{record.get('name')}` (`{where}`): {error.get('type') or 'unknown error'}: {message}"


# ---------------------------------------------------------------------------------------------- plots


def _canvas(panels: int, width: float = 7, height: float = 4.5) -> tuple[Figure, list]:
    columns = min(panels, 3)
    rows = -(-panels // columns)
    fig = Figure(figsize=(width * columns, height * rows), dpi=110, layout="constrained")  # titles clear of axes
    FigureCanvasAgg(fig)  # Agg canvas: no pyplot, no global backend
    return fig, [fig.add_subplot(rows, columns, i + 1) for i in range(panels)]


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def plot(summary: pd.DataFrame) -> bytes:
    """Each table's final metric vs sparsity, one panel per table, as PNG bytes."""
    groups = list(summary.groupby(["task", "data", "model", "setup"], sort=False)) or [(("", "", "", ""), summary)]
    fig, axes = _canvas(len(groups))
    for ax, (names, rows) in zip(axes, groups, strict=True):
        _plot_table(ax, rows, title(*names))
    return _png(fig)


def _plot_table(ax, rows: pd.DataFrame, title: str) -> None:
    done = rows[rows["n"] > 0]
    is_dense = (done["strategy"] == DENSE[0]) & (done["sparsity"] == DENSE[1])
    colors = {DENSE[0]: "0.35"}
    for strategy, line_rows in done[~is_dense].groupby("strategy", sort=True):
        line_rows = line_rows.sort_values("sparsity")
        line = ax.errorbar(line_rows["sparsity"], line_rows["final_mean"], yerr=line_rows["final_std"].fillna(0),
                           marker="o", capsize=3, label=strategy)
        colors[strategy] = line.lines[0].get_color()
    if is_dense.any():
        mean, std = done.loc[is_dense, ["final_mean", "final_std"]].iloc[0]
        ax.axhline(mean, linestyle="--", color=colors["dense"], label=f"dense ({mean:.2f}%)")
        if pd.notna(std):
            ax.axhspan(mean - std, mean + std, color=colors["dense"], alpha=0.12, linewidth=0, label="dense ± std")
    if len(rows) and rows["task"].iloc[0] == "sst2":
        paper = list(PAPER_VAL_ACC.items())
        ax.scatter([s for (_, s), _ in paper], [v for _, v in paper], marker="*", s=180, zorder=5,
                   c=[colors.get(strategy, "black") for (strategy, _), _ in paper], edgecolors="black",
                   label="paper (reported)")
    if done.empty:
        ax.text(0.5, 0.5, "no completed runs", transform=ax.transAxes, ha="center", va="center", color="red")
    metric = rows["metric"].iloc[0] if len(rows) else "val_acc"
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"validation {_pct(metric)}, final epoch")
    ax.set_title(f"{title}\n(error bars: std over seeds)", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")


def plot_cross_task(groups: Mapping[tuple[str, str], pd.DataFrame]) -> bytes:
    """Each configuration's paired Δ vs dense per task, with its 95% interval: one panel per (model, setup)."""
    fig, axes = _canvas(len(groups), width=9)
    for ax, ((model, setup), rows) in zip(axes, groups.items(), strict=True):
        tasks = list(dict.fromkeys(rows["task"]))
        configs = sorted(set(zip(rows["strategy"], rows["sparsity"], strict=True)))
        width = 0.8 / max(1, len(configs))
        for i, (strategy, sparsity) in enumerate(configs):
            mine = rows[(rows["strategy"] == strategy) & (rows["sparsity"] == sparsity)].set_index("task")
            xs = [t + (i - (len(configs) - 1) / 2) * width for t in range(len(tasks))]
            found = [mine.loc[t] if t in mine.index else None for t in tasks]
            ys = [math.nan if f is None else f["diff_vs_dense_mean"] for f in found]
            low = [0 if f is None or pd.isna(f["diff_ci_low"]) else f["diff_vs_dense_mean"] - f["diff_ci_low"]
                   for f in found]
            high = [0 if f is None or pd.isna(f["diff_ci_high"]) else f["diff_ci_high"] - f["diff_vs_dense_mean"]
                    for f in found]
            ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=3, label=f"{strategy} {sparsity:g}")
        ax.axhline(0, color="0.3", linewidth=1)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel("Δ vs dense, primary metric (pp)")
        ax.set_title(" · ".join(p for p in ("Across tasks", model, setup) if p) + "\n(95% t intervals over seeds)",
                     fontsize="medium")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small", ncol=2, loc="best")
    return _png(fig)


# ---------------------------------------------------------------------------------------------- outputs


def write_report(
    dirs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    log_wandb: Mapping[str, Any] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> pd.DataFrame:
    """Write report.md, report.csv and report.png (and report-tasks.png) into ``out_dir`` (default: the
    first dir); return the summary.

    ``log_wandb``: ``wandb.init`` kwargs; when given, the summary is logged as a table under "report".
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
        _log_wandb(summary, log_wandb)
    return summary


def _log_wandb(summary: pd.DataFrame, init_kwargs: Mapping[str, Any]) -> None:
    import wandb  # only when asked: importing it is slow

    try:
        run = wandb.init(**{**init_kwargs, "job_type": "report"})
        # wandb tables take None, not pandas' missing values.
        run.log({"report": wandb.Table(dataframe=summary.astype(object).where(summary.notna(), None))})
    finally:
        wandb.finish()
