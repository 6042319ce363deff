"""The ablation table: ``python -m crisp.report DIR [DIR ...]``.

Reads every results.json below the dirs, keeps one record per run_key and writes ``report.md``,
``report.csv`` and ``report.png`` into the first dir (or ``--out``). One row per (strategy, sparsity):
validation accuracy in percent (mean ± sample std over seeds), and the paired difference vs dense in
percentage points over the seeds completed in both rows, with a 95% t confidence interval.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from crisp import results
from crisp.results import COMPLETED, FAILED, FILENAME, SCHEMA_VERSION

DENSE = ("dense", 0.0)
# Validation accuracy (%) the paper reports, by (strategy, sparsity).
PAPER_VAL_ACC: dict[tuple[str, float], float] = {("dense", 0.0): 90.62, ("uniform", 0.8): 91.59}

MARKDOWN, CSV, PNG = "report.md", "report.csv", "report.png"
COLUMNS = [
    "strategy",
    "sparsity",
    "n",
    "failed",
    "val_acc_final_mean",
    "val_acc_final_std",
    "val_acc_best_mean",
    "val_acc_best_std",
    "val_loss_final_mean",
    "diff_vs_dense_mean",
    "diff_ci_low",
    "diff_ci_high",
    "n_pairs",
    "paper_val_acc",
]
DASH = "–"
_MAX_MESSAGE = 500


class ReportError(Exception):
    """The dirs cannot make a report: one does not exist, or none holds a results.json."""


# ---------------------------------------------------------------------------------------------- reading


def collect(dirs: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """One record per run_key from every results.json below ``dirs``.

    A completed record beats a failed one; among equals the latest ``finished_at`` wins. A file that
    cannot be used becomes a failed record named by its directory. Each record gets ``results_path``.
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
        "name": known.get("name") or path.parent.name,
        "error": {"type": "UnusableResults", "message": f"{FILENAME} {problem}"},
        "results_path": str(path),
    }


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
        and _is_number(_get(record, "final", "val_acc"))
    )
    if record["status"] == COMPLETED and not usable:
        return "completed run without strategy, sparsity, seed or final.val_acc"
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


# ---------------------------------------------------------------------------------------------- table


def summarize(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The table's raw numbers (accuracies in %, differences in percentage points), dense row first."""
    runs = _runs_frame(records)
    done = _one_per_seed(runs[runs["completed"]])
    dense = _by_seed(done, *DENSE)
    rows = []
    for strategy, sparsity in sorted(set(zip(runs["strategy"], runs["sparsity"], strict=True)), key=_row_order):
        group = runs[(runs["strategy"] == strategy) & (runs["sparsity"] == sparsity)]
        completed = done[(done["strategy"] == strategy) & (done["sparsity"] == sparsity)]
        is_dense = (strategy, sparsity) == DENSE
        rows.append(
            {
                "strategy": strategy,
                "sparsity": sparsity,
                "n": len(completed),
                "failed": int((~group["completed"]).sum()),
                "val_acc_final_mean": completed["acc_final"].mean(),
                "val_acc_final_std": completed["acc_final"].std(ddof=1),
                "val_acc_best_mean": completed["acc_best"].mean(),
                "val_acc_best_std": completed["acc_best"].std(ddof=1),
                "val_loss_final_mean": completed["loss_final"].mean(),
                # The dense row is the reference: no difference with itself.
                **(_no_pairs() if is_dense else _paired(_by_seed(done, strategy, sparsity), dense)),
                "paper_val_acc": PAPER_VAL_ACC.get((strategy, sparsity), math.nan),
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.astype({"n": int, "failed": int, "n_pairs": "Int64"})


def _runs_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per record that names its strategy and sparsity (unusable files do not)."""
    rows = []
    for record in records:
        if not isinstance(record.get("strategy"), str) or not _is_number(record.get("sparsity")):
            continue
        sparsity = round(float(record["sparsity"]), 6)  # 0.6 and 0.6000000001 are one row
        rows.append(
            {
                "strategy": results.effective_strategy(record["strategy"], sparsity),
                "sparsity": sparsity,
                "seed": record.get("seed"),
                "completed": record.get("status") == COMPLETED,
                "acc_final": 100 * _number(_get(record, "final", "val_acc")),
                "acc_best": 100 * _number(_get(record, "best", "val_acc")),
                "loss_final": _number(_get(record, "final", "val_loss")),
                "finished": _timestamp(record.get("finished_at")),
                "model": (portable_model(record.get("model")), record.get("data")),
            }
        )
    columns = ["strategy", "sparsity", "seed", "completed", "acc_final", "acc_best", "loss_final", "finished", "model"]
    return pd.DataFrame(rows, columns=columns).astype({"completed": bool})


def _one_per_seed(done: pd.DataFrame) -> pd.DataFrame:
    """Completed runs, one per (strategy, sparsity, seed): pairing and std assume one value per seed."""
    setups = sorted({f"{model} on {data}" for model, data in done["model"]})
    if len(setups) > 1:
        warnings.warn(f"the runs mix models/data ({', '.join(setups)}); rows pool them", stacklevel=3)
    cell = ["strategy", "sparsity", "seed"]
    repeated = done[done.duplicated(cell, keep=False)]
    if not repeated.empty:
        # Different run_keys for one cell mean the config changed between runs: keep the latest.
        cells = sorted({tuple(r) for r in repeated[cell].itertuples(index=False)})
        message = f"several completed runs for (strategy, sparsity, seed) {cells}; keeping the latest"
        warnings.warn(message, stacklevel=3)
    return done.sort_values("finished", kind="stable").drop_duplicates(cell, keep="last")


def _by_seed(done: pd.DataFrame, strategy: str, sparsity: float) -> pd.Series:
    rows = done[(done["strategy"] == strategy) & (done["sparsity"] == sparsity)]
    return rows.set_index("seed")["acc_final"]


def _paired(acc: pd.Series, dense: pd.Series) -> dict[str, float]:
    """Mean difference vs dense over the seeds in both, with a 95% t interval (needs two pairs)."""
    diffs = (acc - dense).dropna()  # aligned on seed: a seed missing on either side is not a pair
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


# ---------------------------------------------------------------------------------------------- markdown


def format_table(summary: pd.DataFrame) -> str:
    """The summary as a markdown table, as printed and as in report.md."""
    header = [
        "strategy",
        "sparsity",
        "n",
        "val acc final (%)",
        "val acc best (%)",
        "val loss final",
        "Δ acc vs dense (pp) [95% CI]",
        "pairs",
        "paper (%)",
        "failed",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in summary.itertuples(index=False):
        cells = [
            row.strategy,
            f"{row.sparsity:g}",
            str(row.n),
            _mean_std(row.val_acc_final_mean, row.val_acc_final_std),
            _mean_std(row.val_acc_best_mean, row.val_acc_best_std),
            _fmt(row.val_loss_final_mean, ".4f"),
            _diff(row.diff_vs_dense_mean, row.diff_ci_low, row.diff_ci_high),
            _fmt(row.n_pairs, "d"),
            _fmt(row.paper_val_acc, ".2f"),
            str(row.failed),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    parts = [
        "# CRISP ablation: top-k attention sparsity",
        "Read from:\n" + "\n".join(f"- `{portable_path(d, out)}`" for d in dirs),
        f"Runs (one per run_key): **{len(completed)} completed**, **{len(failed)} failed**."
        + (f" Model: {', '.join(setups)}." if setups else ""),
        format_table(summary),
        "Validation accuracy in %, mean ± sample std over seeds (– with fewer than two). Δ: paired difference "
        "vs dense in percentage points over the seeds completed in both rows, with a 95% t interval. "
        "Paper: the figure the paper reports.",
        f"![Validation accuracy vs sparsity]({PNG})",
        "## Failed runs\n\n" + ("\n".join(_failure_line(r, out) for r in failed) if failed else "None."),
    ]
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


# ---------------------------------------------------------------------------------------------- plot


def plot(summary: pd.DataFrame) -> bytes:
    """Final validation accuracy vs sparsity as PNG bytes (Agg canvas: no pyplot, no global backend)."""
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = summary[summary["n"] > 0]
    is_dense = (done["strategy"] == DENSE[0]) & (done["sparsity"] == DENSE[1])
    colors = {DENSE[0]: "0.35"}
    for strategy, rows in done[~is_dense].groupby("strategy", sort=True):
        rows = rows.sort_values("sparsity")
        line = ax.errorbar(rows["sparsity"], rows["val_acc_final_mean"], yerr=rows["val_acc_final_std"].fillna(0),
                           marker="o", capsize=3, label=strategy)
        colors[strategy] = line.lines[0].get_color()
    if is_dense.any():
        mean, std = done.loc[is_dense, ["val_acc_final_mean", "val_acc_final_std"]].iloc[0]
        ax.axhline(mean, linestyle="--", color=colors["dense"], label=f"dense ({mean:.2f}%)")
        if pd.notna(std):
            ax.axhspan(mean - std, mean + std, color=colors["dense"], alpha=0.12, linewidth=0, label="dense ± std")
    paper = list(PAPER_VAL_ACC.items())
    ax.scatter([s for (_, s), _ in paper], [v for _, v in paper], marker="*", s=180, zorder=5,
               c=[colors.get(strategy, "black") for (strategy, _), _ in paper], edgecolors="black",
               label="paper (reported)")
    if done.empty:
        ax.text(0.5, 0.5, "no completed runs", transform=ax.transAxes, ha="center", va="center", color="red")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("validation accuracy, final epoch (%)")
    ax.set_title("Validation accuracy vs attention sparsity (error bars: std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- outputs


def write_report(
    dirs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    log_wandb: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Write report.md, report.csv and report.png into ``out_dir`` (default: the first dir); return the summary.

    ``log_wandb``: ``wandb.init`` kwargs; when given, the summary is logged as a table under "report".
    Raises :class:`ReportError`, writing nothing, when a dir does not exist or none holds results.
    """
    dirs = [Path(d) for d in dirs]
    records = collect(dirs)
    if not records:
        raise ReportError(f"no {FILENAME} found under: {', '.join(map(str, dirs))}")
    summary = summarize(records)
    out = Path(out_dir) if out_dir is not None else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    # The markdown comes last, so the image it links to is already there.
    _write_atomic(out / PNG, plot(summary))
    _write_atomic(out / CSV, summary.to_csv(index=False).encode())
    _write_atomic(out / MARKDOWN, markdown(dirs, records, summary, out).encode())
    if log_wandb is not None:
        _log_wandb(summary, log_wandb)
    return summary


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _log_wandb(summary: pd.DataFrame, init_kwargs: Mapping[str, Any]) -> None:
    import wandb  # only when asked: importing it is slow

    try:
        run = wandb.init(**{**init_kwargs, "job_type": "report"})
        # wandb tables take None, not pandas' missing values.
        run.log({"report": wandb.Table(dataframe=summary.astype(object).where(summary.notna(), None))})
    finally:
        wandb.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crisp.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help=f"sweep directories; every {FILENAME} below is read")
    parser.add_argument("--out", metavar="DIR", help="where to write the report (default: the first DIR)")
    parser.add_argument("--wandb-project", metavar="NAME", help="also log the table to this W&B project")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    args = parser.parse_args(argv)
    log_wandb = {"project": args.wandb_project} if args.wandb_project else None
    try:
        summary = write_report(args.dirs, args.out, log_wandb)
    except ReportError as error:
        print(f"crisp.report: {error}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_table(summary))
    print(f"crisp.report: wrote {MARKDOWN}, {CSV}, {PNG} to {args.out or args.dirs[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
