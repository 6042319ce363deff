"""The ablation report: numbers checked against values worked out by hand from fabricated results.json files."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from crisp.report import COLUMNS, collect, summarize, write_report
from crisp.report.__main__ import main

T975_DF1 = 12.706204736174707  # scipy.stats.t.ppf(0.975, 1)
T975_DF2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)
OUTPUTS = ("report.md", "report.csv", "report.png")


def write_run(
    root: Path,
    where: str,
    *,
    strategy: str = "uniform",
    sparsity: float = 0.8,
    seed: int = 1,
    acc: float | None = 0.9,
    best: float | None = None,
    loss: float = 0.3,
    status: str = "completed",
    error: dict | None = None,
    run_key: str | None = None,
    finished_at: str = "2024-05-01T12:00:00+00:00",
    model: str = "distilbert-base-uncased",
    config: dict | None = None,
    task: str | None = None,
    metric: str | None = None,
) -> Path:
    """A results.json at ``root/where``; a failed run (acc=None) has no final/best/history."""
    key = run_key or hashlib.sha256(f"{strategy}/{sparsity}/{seed}".encode()).hexdigest()[:16]
    record = {
        "schema": 1,
        "run_key": key,
        "status": status,
        "error": error,
        "name": f"{strategy}_s{sparsity}_seed{seed}",
        "strategy": strategy,
        "sparsity": sparsity,
        "seed": seed,
        "model": model,
        "data": "sst2",
        "config": {"sparsity": sparsity, "seed": seed, **(config or {})},
        "overrides": [f"sparsity={sparsity}", f"seed={seed}"],
        "layers": {"configured": [sparsity] * 6, "achieved": [sparsity] * 6, "entropy": [0.5] * 6},
        "history": None if acc is None else [{"epoch": 0, "train_loss": 0.4, "val_loss": loss, "val_acc": acc}],
        "final": None if acc is None else {"val_acc": acc, "val_loss": loss, "val_f1": acc, "epoch": 2},
        "best": None if acc is None else {"val_acc": acc if best is None else best, "val_loss": loss, "epoch": 1},
        "timing": {"fit_seconds": 100.0, "train_samples_per_second": 2000.0},
        "started_at": "2024-05-01T11:00:00+00:00",
        "finished_at": finished_at,
    }
    if task:
        record["task"] = record["data"] = task
    if metric:  # the task's primary metric: the final and best epochs hold it
        record["metric"] = metric
        for section in ("final", "best"):
            if record[section]:
                record[section][metric] = record[section].pop("val_acc")
    path = root / where / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """dense x3 seeds; uniform 0.8 x3 (+1 failed); uniform 0.6 x1; ramp 0.6 on seeds 1, 2, 4; one broken file."""
    root = tmp_path / "sweep"
    for seed, acc, best, loss in [(1, 0.90, 0.91, 0.30), (2, 0.91, 0.92, 0.32)]:
        write_run(root, f"0/{seed}", strategy="dense", sparsity=0.0, seed=seed, acc=acc, best=best, loss=loss)
    # sparsity 0 is dense whatever strategy the config named
    write_run(root, "a/b/c/3", strategy="uniform", sparsity=0.0, seed=3, acc=0.92, best=0.93, loss=0.34)
    for seed, acc, best in [(1, 0.91, 0.92), (2, 0.93, 0.94), (3, 0.92, 0.92)]:
        write_run(root, f"1/{seed}", strategy="uniform", sparsity=0.8, seed=seed, acc=acc, best=best)
    oom = {"type": "RuntimeError", "message": "CUDA out of memory.\nTried to allocate 2 GiB", "traceback": "..."}
    write_run(root, "1/4", strategy="uniform", sparsity=0.8, seed=4, acc=None, status="failed", error=oom)
    write_run(root, "2/1", strategy="uniform", sparsity=0.6, seed=1, acc=0.93)
    for seed, acc in [(1, 0.90), (2, 0.92), (4, 0.95)]:
        write_run(root, f"3/deep/{seed}", strategy="ramp", sparsity=0.6, seed=seed, acc=acc)
    broken = root / "broken_run" / "results.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"schema": 1, "status": "compl')
    return root


def row(summary: pd.DataFrame, strategy: str, sparsity: float) -> pd.Series:
    found = summary[(summary["strategy"] == strategy) & (summary["sparsity"] == sparsity)]
    assert len(found) == 1
    return found.iloc[0]


def test_rows_are_dense_first_then_by_strategy_and_sparsity(sweep):
    summary = summarize(collect([sweep]))
    assert list(summary.columns) == COLUMNS
    assert list(zip(summary["strategy"], summary["sparsity"], strict=True)) == [
        ("dense", 0.0), ("ramp", 0.6), ("uniform", 0.6), ("uniform", 0.8)
    ]


def test_means_stds_and_best_epoch(sweep):
    summary = summarize(collect([sweep]))
    dense = row(summary, "dense", 0.0)
    assert dense["n"] == 3 and dense["failed"] == 0
    assert dense["final_mean"] == pytest.approx(91.0)  # 90, 91, 92
    assert dense["final_std"] == pytest.approx(1.0)
    assert dense["best_mean"] == pytest.approx(92.0)  # 91, 92, 93
    assert dense["best_std"] == pytest.approx(1.0)
    assert dense["val_loss_final_mean"] == pytest.approx(0.32)
    uniform = row(summary, "uniform", 0.8)
    assert uniform["final_mean"] == pytest.approx(92.0)  # 91, 93, 92
    assert uniform["best_mean"] == pytest.approx(92.666667)  # 92, 94, 92
    assert uniform["best_std"] == pytest.approx(math.sqrt((0.666667**2 * 2 + 1.333333**2) / 2), abs=1e-5)
    ramp = row(summary, "ramp", 0.6)
    assert ramp["final_mean"] == pytest.approx(92.333333)  # 90, 92, 95
    assert ramp["final_std"] == pytest.approx(math.sqrt((2.333333**2 + 0.333333**2 + 2.666667**2) / 2))
    single = row(summary, "uniform", 0.6)
    assert single["n"] == 1 and math.isnan(single["final_std"]) and math.isnan(single["best_std"])


def test_paired_difference_and_confidence_interval(sweep):
    summary = summarize(collect([sweep]))
    uniform = row(summary, "uniform", 0.8)  # diffs 1, 2, 0 pp: mean 1, sd 1
    half = T975_DF2 * 1.0 / math.sqrt(3)
    assert uniform["n_pairs"] == 3
    assert uniform["diff_vs_dense_mean"] == pytest.approx(1.0)
    assert uniform["diff_ci_low"] == pytest.approx(1.0 - half)
    assert uniform["diff_ci_high"] == pytest.approx(1.0 + half)
    ramp = row(summary, "ramp", 0.6)  # seed 4 has no dense run: pairs are seeds 1, 2 with diffs 0, 1
    half = T975_DF1 * math.sqrt(0.5) / math.sqrt(2)
    assert ramp["n_pairs"] == 2
    assert ramp["diff_vs_dense_mean"] == pytest.approx(0.5)
    assert (ramp["diff_ci_low"], ramp["diff_ci_high"]) == pytest.approx((0.5 - half, 0.5 + half))
    single = row(summary, "uniform", 0.6)  # one pair: a difference, no interval
    assert single["n_pairs"] == 1 and single["diff_vs_dense_mean"] == pytest.approx(3.0)
    assert math.isnan(single["diff_ci_low"]) and math.isnan(single["diff_ci_high"])
    dense = row(summary, "dense", 0.0)
    assert pd.isna(dense["n_pairs"]) and math.isnan(dense["diff_vs_dense_mean"])


def test_no_dense_row_means_no_pairs(tmp_path):
    write_run(tmp_path, "1", seed=1, acc=0.9)
    uniform = row(summarize(collect([tmp_path])), "uniform", 0.8)
    assert uniform["n_pairs"] == 0 and math.isnan(uniform["diff_vs_dense_mean"])


def test_paper_column(sweep):
    summary = summarize(collect([sweep]))
    assert row(summary, "dense", 0.0)["paper"] == 90.62
    assert row(summary, "uniform", 0.8)["paper"] == 91.59
    assert math.isnan(row(summary, "ramp", 0.6)["paper"])


def test_deduplicates_by_run_key(tmp_path):
    # Same run_key four times: a completed run beats a later failure; the latest completed one wins.
    write_run(tmp_path, "old", acc=0.50, run_key="k" * 16, finished_at="2024-05-01T10:00:00+00:00")
    write_run(tmp_path, "new", acc=0.91, run_key="k" * 16, finished_at="2024-05-02T10:00:00+00:00")
    write_run(tmp_path, "mid", acc=0.70, run_key="k" * 16, finished_at="2024-05-01T20:00:00+00:00")
    write_run(tmp_path, "failed", acc=None, status="failed", run_key="k" * 16, finished_at="2024-05-03T10:00:00+00:00",
              error={"type": "ValueError", "message": "boom"})
    records = collect([tmp_path])
    assert len(records) == 1
    assert records[0]["final"]["val_acc"] == 0.91
    assert row(summarize(records), "uniform", 0.8)["failed"] == 0


def test_one_run_with_two_different_completed_results_is_said_with_both_folders_and_the_one_kept(tmp_path, capsys):
    """The same run_key trained in lockstep (folder a) and alone (folder b): dropout draws differ, so do the numbers."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, "dense_seed1", strategy="dense", sparsity=0.0, acc=0.996, run_key="k" * 16,
              finished_at="2024-05-01T10:00:00+00:00")
    write_run(b, "dense_seed1", strategy="dense", sparsity=0.0, acc=0.988, run_key="k" * 16,
              finished_at="2024-05-02T10:00:00+00:00")
    assert main([str(a), str(b), "--quiet"]) == 0
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if "two different completed results" in line)
    assert f"{b / 'dense_seed1'} (val_acc 0.9880, finished 2024-05-02T10:00:00+00:00)" in warning
    assert f"{a / 'dense_seed1'} (val_acc 0.9960, finished 2024-05-01T10:00:00+00:00)" in warning
    assert warning.endswith(f"the report keeps the one that finished last, {b / 'dense_seed1'}")
    assert row(summarize(collect([a, b])), "dense", 0.0)["final_mean"] == pytest.approx(98.8)
    capsys.readouterr()
    # the same result twice (a copied folder) is one result: nothing to say
    write_run(tmp_path / "c", "dense_seed1", strategy="dense", sparsity=0.0, acc=0.988, run_key="k" * 16,
              finished_at="2024-05-02T10:00:00+00:00")
    collect([b, tmp_path / "c"])
    assert "two different" not in capsys.readouterr().err


def test_a_table_of_runs_that_all_failed_is_headed_by_its_tasks_metric(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path, f"stsb/dense_seed{seed}", strategy="dense", sparsity=0.0, seed=seed, acc=None,
                  status="failed", task="stsb", metric="val_pearson", error={"type": "DataError", "message": "bad"})
    summary = write_report([tmp_path])
    assert summary["metric"].tolist() == ["val_pearson"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| strategy | sparsity | n | Pearson r (%) final | Pearson r (%) best |" in markdown
    assert "accuracy" not in markdown


def test_one_run_per_seed_when_configs_differ(tmp_path, capsys):
    # Two run_keys for one (strategy, sparsity, seed) of one recipe: how they ran changed; the latest counts.
    write_run(tmp_path, "a", acc=0.80, run_key="a" * 16, finished_at="2024-05-02T10:00:00+00:00")
    write_run(tmp_path, "b", acc=0.70, run_key="b" * 16, finished_at="2024-05-01T10:00:00+00:00")
    summary = summarize(collect([tmp_path]))
    assert "several completed runs" in capsys.readouterr().err
    assert row(summary, "uniform", 0.8)["n"] == 1
    assert row(summary, "uniform", 0.8)["final_mean"] == pytest.approx(80.0)


def test_merges_several_dirs_and_writes_into_the_first(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    write_run(first, "0/1", strategy="dense", sparsity=0.0, seed=1, acc=0.90)
    write_run(second, "0/2", strategy="dense", sparsity=0.0, seed=2, acc=0.92)
    write_run(second, "1/1", seed=1, acc=0.93)
    summary = write_report([first, second])
    assert row(summary, "dense", 0.0)["n"] == 2
    assert row(summary, "dense", 0.0)["final_mean"] == pytest.approx(91.0)
    assert row(summary, "uniform", 0.8)["diff_vs_dense_mean"] == pytest.approx(3.0)
    assert all((first / name).exists() for name in OUTPUTS)
    assert not any((second / name).exists() for name in OUTPUTS)
    markdown = (first / "report.md").read_text()
    assert "Read from:\n- `first` (this folder)\n- `.../second`" in markdown  # where it is, not a machine's paths
    assert str(tmp_path) not in markdown


def test_a_committed_report_shows_no_machine_paths(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep, "0/1", strategy="dense", sparsity=0.0, seed=1, acc=0.90, model="/home/me/models/minilm-l6")
    write_run(sweep, "1/1", seed=1, acc=0.93, model="/home/me/models/minilm-l6")
    write_run(sweep, "1/2", seed=2, acc=None, status="failed",
              error={"type": "Stalled", "message": f"log: {sweep}/1/2/worker.log"})
    write_report([sweep])
    markdown = (sweep / "report.md").read_text()
    assert "Model: minilm-l6 on" in markdown and "`1/2`" in markdown and "log: 1/2/worker.log" in markdown
    assert "/home/me" not in markdown and str(tmp_path) not in markdown


def test_failed_and_unparseable_runs_are_counted_and_listed(sweep):
    records = collect([sweep])
    failed = [r for r in records if r["status"] == "failed"]
    assert sorted(r["name"] for r in failed) == ["broken_run", "uniform_s0.8_seed4"]
    summary = write_report([sweep])
    assert row(summary, "uniform", 0.8)["failed"] == 1
    markdown = (sweep / "report.md").read_text()
    assert "**10 completed**, **2 failed**" in markdown
    failures = markdown.split("## Failed runs")[1]
    assert "`uniform_s0.8_seed4`" in failures
    assert "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB" in failures  # one line per run
    assert "`broken_run`" in failures and "cannot be read or parsed" in failures


def test_outputs_and_csv_numbers(sweep):
    write_report([sweep])
    for name in OUTPUTS:
        assert (sweep / name).stat().st_size > 0
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(sweep.glob(".*.tmp"))
    csv = pd.read_csv(sweep / "report.csv")
    assert list(csv.columns) == COLUMNS
    uniform = row(csv, "uniform", 0.8)
    assert (uniform["n"], uniform["failed"], uniform["n_pairs"]) == (3, 1, 3)
    assert uniform["final_mean"] == pytest.approx(92.0)
    assert uniform["final_std"] == pytest.approx(1.0)
    assert uniform["diff_ci_high"] == pytest.approx(1.0 + T975_DF2 / math.sqrt(3))
    assert uniform["paper"] == 91.59
    single = row(csv, "uniform", 0.6)  # undefined values are empty cells
    assert math.isnan(single["final_std"]) and math.isnan(single["diff_ci_low"])
    assert math.isnan(row(csv, "dense", 0.0)["n_pairs"])


def test_markdown_table_formatting(sweep):
    write_report([sweep])
    markdown = (sweep / "report.md").read_text()
    lines = {line.split(" | ")[0] + " | " + line.split(" | ")[1]: line for line in markdown.splitlines()
             if line.startswith("| ") and " | " in line}
    # half-width of the uniform 0.8 interval: 4.3027 / sqrt(3) = 2.4841
    assert lines["| dense | 0"] == "| dense | 0 | 3 | 91.00 ± 1.00 | 92.00 ± 1.00 | 0.3200 | – | – | 90.62 | 0 |"
    assert lines["| uniform | 0.8"] == (
        "| uniform | 0.8 | 3 | 92.00 ± 1.00 | 92.67 ± 1.15 | 0.3000 | +1.00 [-1.48, +3.48] | 3 | 91.59 | 1 |"
    )
    assert lines["| uniform | 0.6"] == "| uniform | 0.6 | 1 | 93.00 ± – | 93.00 ± – | 0.3000 | +3.00 [–] | 1 | – | 0 |"
    assert "![Each table's metric vs sparsity](report.png)" in markdown
    assert "## sst2 · distilbert-base-uncased\n\n| strategy | sparsity | n | accuracy (%) final |" in markdown


def test_all_failed_sweep_still_reports(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path, f"run{seed}", seed=seed, acc=None, status="failed",
                  error={"type": "ValueError", "message": f"bad batch size {seed}"})
    summary = write_report([tmp_path])
    uniform = row(summary, "uniform", 0.8)
    assert (uniform["n"], uniform["failed"]) == (0, 2)
    assert math.isnan(uniform["final_mean"])
    markdown = (tmp_path / "report.md").read_text()
    assert "**0 completed**, **2 failed**" in markdown
    assert "ValueError: bad batch size 1" in markdown and "ValueError: bad batch size 2" in markdown
    assert (tmp_path / "report.png").stat().st_size > 0 and (tmp_path / "report.csv").stat().st_size > 0


def test_cli_prints_the_table_and_exits_1_for_an_unusable_results_file(sweep, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert main([str(sweep), "--out", str(out)]) == 1  # the fixture holds a broken results.json
    captured = capsys.readouterr()
    assert f"cannot use {sweep / 'broken_run' / 'results.json'}: results.json cannot be read" in captured.err
    printed = captured.out
    assert printed.startswith("## sst2 · distilbert-base-uncased\n\n| strategy | sparsity |")
    assert "| uniform | 0.8 | 3 |" in printed
    assert all((out / name).exists() for name in OUTPUTS)
    assert not any((sweep / name).exists() for name in OUTPUTS)
    (sweep / "broken_run" / "results.json").unlink()
    assert main([str(sweep), "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_missing_dir(sweep, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main([str(sweep), str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists()
    assert not any((sweep / name).exists() for name in OUTPUTS)


def test_cli_dir_without_results(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "results.json" in err
    assert [p.name for p in empty.rglob("*")] == ["sub"]


class FakeWandb(types.ModuleType):
    """Records what the report does with wandb, so no network or wandb service is involved."""

    def __init__(self, fail_on_log: bool = False):
        super().__init__("wandb")
        self.calls: list[tuple] = []
        self.fail_on_log = fail_on_log

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def Table(self, dataframe):  # noqa: N802 (wandb's name)
        return ("table", dataframe)

    def Image(self, path):  # noqa: N802 (wandb's name)
        return ("image", path)

    def log(self, data):
        if self.fail_on_log:
            raise RuntimeError("network down")
        self.calls.append(("log", data))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_logs_the_table(sweep, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    write_report([sweep], log_wandb={"project": "crisp", "mode": "offline"})
    (_, init), (_, logged), finish = fake.calls
    assert init == {"project": "crisp", "mode": "offline", "job_type": "report"}
    kind, table = logged["report"]
    assert kind == "table" and list(table.columns) == COLUMNS and len(table) == 4
    assert table["final_std"].tolist()[2] is None  # missing values are None for wandb
    kind, paired = logged["paired_delta"]  # the paired difference against dense, the rows that have one
    assert kind == "table" and "diff_vs_dense_mean" in paired.columns and (paired["n_pairs"] > 0).all()
    assert logged["plot"] == ("image", str(sweep / "report.png"))
    assert finish == ("finish",)


def test_wandb_finishes_even_when_logging_fails(sweep, monkeypatch):
    fake = FakeWandb(fail_on_log=True)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(RuntimeError):
        write_report([sweep], log_wandb={"project": "crisp"})
    assert fake.calls[-1] == ("finish",)


def test_runs_that_differ_in_more_than_seed_strategy_and_sparsity_are_never_pooled(tmp_path):
    """SST-2 and synthetic runs in one folder, and two learning rates: a table each, paired Δ within each."""
    cells = [("sst2_local", 2e-5, 0.90, 0.91), ("synthetic", 2e-5, 0.50, 0.60), ("sst2_local", 5e-5, 0.80, 0.78)]
    for data, lr, dense, sparse in cells:
        for seed in (1, 2):
            config = {"data": {"name": data}, "optim": {"lr": lr}}
            key = f"{data}{lr}{seed}"
            write_run(tmp_path, f"{data}/{lr}/dense_{seed}", strategy="dense", sparsity=0.0, seed=seed, acc=dense,
                      config=config, run_key=hashlib.sha256(f"d{key}".encode()).hexdigest()[:16])
            write_run(tmp_path, f"{data}/{lr}/u_{seed}", seed=seed, acc=sparse + seed / 100, config=config,
                      run_key=hashlib.sha256(f"u{key}".encode()).hexdigest()[:16])
    summary = summarize(collect([tmp_path]))
    assert sorted(summary["setup"].unique()) == [
        "data.name=sst2_local, optim.lr=2e-05", "data.name=sst2_local, optim.lr=5e-05",
        "data.name=synthetic, optim.lr=2e-05"]
    assert (summary["n"] == 2).all()
    sparse = summary[summary["strategy"] == "uniform"].set_index("setup")["diff_vs_dense_mean"]
    assert sparse["data.name=synthetic, optim.lr=2e-05"] == pytest.approx(11.5)  # 61, 62 vs 50, 50
    assert sparse["data.name=sst2_local, optim.lr=5e-05"] == pytest.approx(-0.5)  # 79, 80 vs 80, 80
    markdown = (write_report([tmp_path]), (tmp_path / "report.md").read_text())[1]
    assert markdown.count("| dense | 0 | 2 |") == 3


def test_each_task_reports_its_own_metric_and_a_cross_task_table_compares_them(tmp_path):
    """CoLA in Matthews correlation, STS-B in Pearson's r; the cross-task table marks intervals that exclude 0."""
    for task, metric, dense, sparse in (("cola", "val_mcc", 0.40, (0.45, 0.46, 0.47)),
                                        ("stsb", "val_pearson", 0.85, (0.80, 0.86, 0.83))):
        for seed in (1, 2, 3):
            common = {"config": {"data": {"name": task, "hub_config": task}}, "task": task, "metric": metric}
            write_run(tmp_path, f"{task}/d{seed}", strategy="dense", sparsity=0.0, seed=seed, acc=dense,
                      run_key=f"{task}d{seed}".ljust(16, "x"), **common)
            write_run(tmp_path, f"{task}/u{seed}", seed=seed, acc=sparse[seed - 1],
                      run_key=f"{task}u{seed}".ljust(16, "x"), **common)
    summary = write_report([tmp_path])
    assert summary.set_index("task")["metric"].to_dict() == {"cola": "val_mcc", "stsb": "val_pearson"}
    assert summary["paper"].isna().all()  # the paper's figures are SST-2's
    cola = summary[(summary["task"] == "cola") & (summary["strategy"] == "uniform")].iloc[0]
    assert cola["diff_vs_dense_mean"] == pytest.approx(6.0)  # 5, 6, 7 pp
    markdown = (tmp_path / "report.md").read_text()
    assert "## cola · distilbert-base-uncased\n\n| strategy | sparsity | n | Matthews corr. (%) final |" in markdown
    assert "Pearson r (%) final" in markdown
    across = markdown.split("## Across tasks")[1]
    assert "| configuration | cola (Matthews corr.) | stsb (Pearson r) |" in across
    half = T975_DF2 * 1.0 / math.sqrt(3)
    assert f"| uniform 0.8 | +6.00 [{6 - half:+.2f}, {6 + half:+.2f}] ✱ | -2.00 [" in across  # stsb: -5, +1, -2 pp
    assert (tmp_path / "report-tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_results_name_no_machine_path():
    """Results travel between machines: no /work, /tmp, /root or /home path in what is committed."""
    import re

    root = Path(__file__).resolve().parents[1] / "multirun" / "results"
    found = [str(p.relative_to(root)) for p in root.rglob("results.json")
             if re.search(r'"/(work|tmp|root|home|opt)/', p.read_text())]
    assert not found, found[:5]
    assert len(list(root.rglob("results.json"))) > 500
