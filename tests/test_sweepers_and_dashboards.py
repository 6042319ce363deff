"""Hydra's Optuna sweeper over crisp's runs, what W&B shows of a sweep, and a sweep's progress on its terminal."""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crisp.core.objective import RunResult, objective_of
from tests.conftest import ROOT, run_crisp, smoke_overrides
from tests.test_trainer_options import make

# ---------------------------------------------------------------------------------------------- objective


def test_a_runs_record_is_its_objective_as_a_float():
    record = {"status": "completed", "metric": "val_mcc", "final": {"val_mcc": 0.4, "epoch": 2},
              "best": {"val_mcc": 0.5, "epoch": 1}}
    assert objective_of(record) == 0.4 and objective_of(record, "best") == 0.5
    assert math.isnan(objective_of({"status": "failed", "error": {}}))
    result = pickle.loads(pickle.dumps(RunResult(record, 0.4)))  # (it travels back from worker processes)
    assert float(result) == 0.4 and result["metric"] == "val_mcc" and result.get("status") == "completed"


def test_hydra_sweeper_optuna_maximises_with_crisps_defaults():
    from hydra import compose, initialize_config_dir

    from crisp.core.config import scan_plugins

    scan_plugins()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "hydra/sweeper=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper.direction.name == "maximize" and cfg.hydra.sweeper.study_name == "crisp"
    assert cfg.hydra.sweeper.sampler.seed == 1  # the same command asks for the same trials again
    assert make("experiment=smoke").objective == "final"


@pytest.mark.slow
def test_optuna_over_sparsity_names_its_best_trial_and_the_report_reads_its_folder(tmp_path):
    proc = run_crisp("-m", "experiment=smoke", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4",
                     "sparsity=interval(0,0.9)", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    trials = sorted(p.parent.relative_to(tmp_path) for p in tmp_path.rglob("results.json"))
    assert [str(t).split("/")[0] for t in trials] == ["trial0", "trial1", "trial2", "trial3"]
    records = {str(t): json.loads((tmp_path / t / "results.json").read_text()) for t in trials}
    best = max(records, key=lambda t: records[t]["final"]["val_acc"])
    line = re.search(r"best trial: (\S+) \(.*\): val_acc ([0-9.]+)", said)
    assert line and line.group(1) == best and float(line.group(2)) == pytest.approx(records[best]["final"]["val_acc"],
                                                                                    abs=1e-4)
    assert "Best value: " in said  # Optuna's own summary: the value crisp handed it
    # the same command again: its seeded sampler asks for the same trials, each found completed, and the skipped
    # runs hand Optuna the objectives they completed with
    again = run_crisp("-m", "experiment=smoke", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4",
                      "sparsity=interval(0,0.9)", f"hydra.sweep.dir={tmp_path}")
    assert again.returncode == 0 and (again.stdout + again.stderr).count("already completed") == 4
    assert line.group(0) in again.stdout + again.stderr
    report = subprocess.run([sys.executable, "-m", "crisp.report", str(tmp_path), "--quiet"], cwd=ROOT,
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "report.md").read_text()
    rows = [f"| uniform | {round(r['sparsity'], 6):g} | 1 |" for r in records.values() if r["sparsity"] > 0]
    assert rows and all(row in table for row in rows), table  # a row for each trial (the report rounds to 6 places)


# ---------------------------------------------------------------------------------------------- W&B


def test_the_seeds_of_one_configuration_share_a_wandb_group_even_with_data_derived_from_the_seed():
    from crisp.core.config import resolved_config, written_config
    from crisp.training.loggers import group_name

    def group(*overrides):
        cfg = make("experiment=smoke", *overrides)
        assert cfg.data.data_seed == cfg.seed  # data_seed: ${seed}
        return group_name(resolved_config(cfg), written_config(cfg))

    assert group("seed=1") == group("seed=2") != group("seed=1", "sparsity=0.8")
    assert group("seed=1", "sparsity=0.8") == group("seed=3", "sparsity=0.8")


def wandb_records(run_dir: Path) -> dict:
    """A W&B offline run's records, read with wandb's own reader (``wandb leet inspect --json``): the run's
    settings, its summary (all its updates) and what it logged."""
    [log] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(log)],
                         capture_output=True, text=True, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    summary, logged = {}, set()
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
        if r["type"] == "history":
            logged |= {key.split(".")[0] for key in r["history"]["item"]}
    [run] = [r["run"] for r in records if r["type"] == "run"]
    return {"run": run, "config": run["config"]["update"], "summary": summary, "logged": logged}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wandb", path=str(Path(sys.executable).parent)) is None, reason="no wandb CLI")
def test_a_two_seed_grid_on_wandb_offline_one_group_the_sweep_id_everywhere_and_progress_before_any_run_ends(
        tmp_path):
    """Offline W&B: the runs of a seed share one group; every run and the report's run carry the sweep's id; the
    summary holds final and best; the report run holds the paired-delta table and the plot. The sweep's output
    shows progress lines (runs, epoch, step, samples/s, ETA) before its first run completes."""
    sweep = tmp_path / "sweep"
    argv = [sys.executable, "-u", "-m", "crisp.run", "-m",
            *smoke_overrides(sweep, "logger=wandb", "data.num_train=2048", "trainer.max_epochs=2",
                             "sweep.progress_every_s=0.5", sweep=True), "seed=1,2", "sparsity=0,0.8"]
    env = {**__import__("os").environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = proc.stdout.read().splitlines()
    assert proc.wait(timeout=900) == 0, "\n".join(lines[-40:])
    first_completed = next(i for i, text in enumerate(lines) if re.search(r"\S+ completed: val_acc", text))
    shape = r"group0: 4 runs \| epoch [12]/2 \| step \d+/128 \| [\d,]+ samples/s \| ETA \d+:\d\d"
    progress = [text for text in lines[:first_completed] if re.search(shape, text)]
    assert progress, "\n".join(lines[:first_completed])
    runs = {name: wandb_records(sweep / name) for name in
            ("dense_seed1", "dense_seed2", "uniform_s0.8_seed1", "uniform_s0.8_seed2")}
    groups = {name: r["run"]["run_group"] for name, r in runs.items()}
    assert groups["dense_seed1"] == groups["dense_seed2"] != groups["uniform_s0.8_seed1"]
    assert groups["uniform_s0.8_seed1"] == groups["uniform_s0.8_seed2"]
    for r in runs.values():
        assert f"sweep:{sweep.name}" in r["run"]["tags"] and r["config"]["sweep_id"] == sweep.name
        assert r["run"]["job_type"] == "train"
        assert {"final/val_acc", "best/val_acc", "best/epoch"} <= set(r["summary"])
    report = wandb_records(sweep)
    assert report["run"]["job_type"] == "report" and report["config"]["sweep_id"] == sweep.name
    assert f"sweep:{sweep.name}" in report["run"]["tags"]
    assert {"report", "paired_delta", "plot"} <= report["logged"]
    assert list(sweep.glob("wandb/offline-run-*/files/media/images/plot_*.png"))
    [delta] = sweep.glob("wandb/offline-run-*/files/media/table/paired_delta_*.table.json")
    table = json.loads(delta.read_text())
    assert "diff_vs_dense_mean" in table["columns"] and len(table["data"]) == 1  # uniform 0.8 against dense


# ---------------------------------------------------------------------------------------------- progress


def test_progress_lines_say_runs_epoch_step_throughput_and_time_left(tmp_path, caplog):
    import logging
    from types import SimpleNamespace

    from crisp.sweep.progress import ProgressLines, line

    status = {"runs": 4, "epoch": 2, "epochs": 3, "step": 120, "steps": 192, "samples_per_s": 1850.4, "eta_s": 74}
    assert line("group0", status) == "group0: 4 runs | epoch 2/3 | step 120/192 | 1,850 samples/s | ETA 1:14"
    (tmp_path / "heartbeat").write_text(json.dumps(status))
    shown = ProgressLines(every_s=0)  # not a terminal here: plain log lines
    with caplog.at_level(logging.INFO, logger="crisp"):
        shown.show([SimpleNamespace(label="group0", files=tmp_path)])
        shown.show([SimpleNamespace(label="group0", files=tmp_path)])  # unchanged: not repeated
    assert [r.getMessage() for r in caplog.records] == [line("group0", status)]


def test_on_a_terminal_the_progress_lines_are_redrawn_in_place(tmp_path, monkeypatch):
    import io
    from types import SimpleNamespace

    from crisp.sweep.progress import ProgressLines

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    for name, step in (("a", 3), ("b", 7)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "heartbeat").write_text(json.dumps({"runs": 1, "epoch": 1, "epochs": 2, "step": step,
                                                                "steps": 10, "samples_per_s": 5.0, "eta_s": 9}))
    screen = Terminal()
    shown = ProgressLines(stream=screen)
    tasks = [SimpleNamespace(label=name, files=tmp_path / name) for name in ("a", "b")]
    shown.show(tasks)
    shown.show(tasks)  # the two lines again, over the first two: cursor up two lines, erase, write
    first = ("a: 1 run | epoch 1/2 | step 3/10 | 5 samples/s | ETA 0:09\n"
             "b: 1 run | epoch 1/2 | step 7/10 | 5 samples/s | ETA 0:09\n")
    assert screen.getvalue() == first + "\x1b[2F\x1b[J" + first
    shown.clear()
    assert screen.getvalue().endswith("\x1b[2F\x1b[J")
