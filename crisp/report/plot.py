"""The report's pictures: each table's metric against sparsity, and each configuration's Δ across tasks."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from crisp.report.render import DASH, METRIC_NAMES, pct  # noqa: F401
from crisp.report.statistics import DENSE, DENSE_CELL, PAPER_VAL_ACC, configuration, in_cell, title


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


def _curve(row) -> tuple[str, float]:
    """A row's curve (its legend: the configuration without its sparsity, ``random uniform``) and its x: the
    sparsity, or for dense with attention dropout alone the dropout's rate (the matched control of a
    sparsity that drops that share)."""
    if row.strategy == "dense" and row.dropout.startswith("attention=") and "," not in row.dropout:
        return "dense + attention dropout (x: its rate)", float(row.dropout.removeprefix("attention="))
    label = configuration(row)
    return (label if row.strategy in ("none", "dense") else label.replace(f" {row.sparsity:g}", "", 1)), row.sparsity


def _plot_table(ax, rows: pd.DataFrame, title: str) -> None:
    """One curve per (sparsifier, strategy, dropout) over sparsity; dense as a band; a configuration without
    sparsity (entmax, dense with dropout) as one point at sparsity 0."""
    done = rows[rows["n"] > 0]
    is_dense = in_cell(done, DENSE_CELL)
    colors = {DENSE[0]: "0.35"}
    placed = [_curve(r) for r in done[~is_dense].itertuples(index=False)]
    curves = done[~is_dense].assign(curve=[c for c, _ in placed], x=[x for _, x in placed])
    for label, line_rows in curves.groupby("curve", sort=True):
        line_rows = line_rows.sort_values("x")
        alone = len(line_rows) == 1 and line_rows["x"].iloc[0] == 0
        line = ax.errorbar(line_rows["x"], line_rows["final_mean"], yerr=line_rows["final_std"].fillna(0),
                           marker="D" if alone else "o", linestyle="none" if alone else "-", capsize=3, label=label)
        colors[label] = line.lines[0].get_color()
    if is_dense.any():
        mean, std = done.loc[is_dense, ["final_mean", "final_std"]].iloc[0]
        ax.axhline(mean, linestyle="--", color=colors["dense"], label=f"dense ({mean:.2f}%)")
        if pd.notna(std):
            ax.axhspan(mean - std, mean + std, color=colors["dense"], alpha=0.12, linewidth=0, label="dense ± std")
    if len(rows) and rows["task"].iloc[0] == "sst2" and rows["data"].iloc[0] in ("sst2", "sst2_local"):
        paper = list(PAPER_VAL_ACC.items())
        ax.scatter([s for (_, s), _ in paper], [v for _, v in paper], marker="*", s=180, zorder=5,
                   c=[colors.get(strategy, "black") for (strategy, _), _ in paper], edgecolors="black",
                   label="paper (reported)")
    if done.empty:
        ax.text(0.5, 0.5, "no completed runs", transform=ax.transAxes, ha="center", va="center", color="red")
    metric = rows["metric"].iloc[0] if len(rows) else "val_acc"
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"validation {pct(metric)}, final epoch")
    ax.set_title(f"{title}\n(error bars: std over seeds)", fontsize="medium")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to name when no run completed
        ax.legend(fontsize="small", loc="best")


def plot_cross_task(groups: Mapping[tuple[str, str], pd.DataFrame]) -> bytes:
    """Each configuration's paired Δ vs dense per task, with its 95% interval: one panel per (model, setup)."""
    fig, axes = _canvas(len(groups), width=9)
    for ax, ((model, setup), rows) in zip(axes, groups.items(), strict=True):
        tasks = list(dict.fromkeys(rows["task"]))
        labelled = rows.assign(configuration=[configuration(r) for r in rows.itertuples(index=False)])
        configs = sorted(set(labelled["configuration"]))
        width = 0.8 / max(1, len(configs))
        for i, label in enumerate(configs):
            mine = labelled[labelled["configuration"] == label].set_index("task")
            xs = [t + (i - (len(configs) - 1) / 2) * width for t in range(len(tasks))]
            found = [mine.loc[t] if t in mine.index else None for t in tasks]
            ys = [math.nan if f is None else f["diff_vs_dense_mean"] for f in found]
            low = [0 if f is None or pd.isna(f["diff_ci_low"]) else f["diff_vs_dense_mean"] - f["diff_ci_low"]
                   for f in found]
            high = [0 if f is None or pd.isna(f["diff_ci_high"]) else f["diff_ci_high"] - f["diff_vs_dense_mean"]
                    for f in found]
            ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=3, label=label)
        ax.axhline(0, color="0.3", linewidth=1)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel("Δ vs dense, primary metric (pp)")
        ax.set_title(" · ".join(p for p in ("Across tasks", model, setup) if p) + "\n(95% t intervals over seeds)",
                     fontsize="medium")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small", ncol=2, loc="best")
    return _png(fig)
