"""The report's pictures: each table's metric against sparsity, and each configuration's Δ across tasks."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from crisp.report.render import DASH, METRIC_NAMES, pct  # noqa: F401
from crisp.report.statistics import DENSE, PAPER_VAL_ACC, title


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
