"""``hydra/launcher=slurm`` on a real one-node SLURM cluster (tests/slurm_cluster.py): arrays, preemption,
cancellation and time limits, with sbatch, squeue, scontrol and scancel as they are.

Run them with ``pytest -m slurm`` after ``apt-get install slurm-wlm munge`` (as root); without SLURM they
are skipped, except in CI (``CI`` set), where a cluster that cannot start fails them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from crisp.core import results
from tests.conftest import ROOT, run_crisp, smoke_overrides
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster, missing_requirements

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="session")
def cluster():
    """One cluster for the session: 4 CPUs declared, so a few array tasks run at once."""
    why = missing_requirements()
    if why is None:
        cluster = SlurmCluster(cpus=4)
        try:
            cluster.start()
        except ClusterUnavailable as err:
            why = f"the test cluster did not start: {err}"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI installs SLURM for these tests, but {why}")
        pytest.skip(why)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm(cluster):
    """The cluster, emptied of jobs after each test (a failed test may leave tasks running)."""
    yield cluster
    cluster.run("scancel", "-u", "root", check=False)
    deadline = time.monotonic() + 60
    while cluster.jobs() and time.monotonic() < deadline:
        time.sleep(0.5)


def launcher(cluster: SlurmCluster, *extra: str, kind: str = "slurm") -> list[str]:
    """The README's worked example (partition, time limit, parallelism), sized for a CPU-only test node."""
    return [f"hydra/launcher={kind}", f"hydra.launcher.partition={cluster.partition}", "hydra.launcher.timeout_min=10",
            "hydra.launcher.array_parallelism=2", "hydra.launcher.gpus_per_task=null",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=null", "hydra.launcher.poll_s=1", *extra]


def records(sweep_dir) -> dict[str, dict]:
    return {r["name"]: r for r in (results.read(p) for p in results.find_all(sweep_dir))}


def array_tasks(log: str) -> tuple[str, dict[str, str]]:
    """The job id the sweep submitted and its tasks by run name, from the sweep's log."""
    job = re.search(r"SLURM job (\d+): ", log).group(1)
    return job, {name: task for task, name in re.findall(r"  task (\S+): (\S+)", log)}


def task_log(sweep_dir: Path, task: str) -> str:
    path = sweep_dir / ".submitit" / task / f"{task}_0_log.out"
    return path.read_text(errors="replace") if path.is_file() else ""


def squeue(cluster: SlurmCluster, task: str) -> tuple[str, int]:
    """(state, restarts) of one task, as squeue reports it."""
    out = cluster.run("squeue", "-h", "-t", "all", "-j", task, "-O", "State:|,RestartCnt:|").strip()
    state, restarts = out.split("|")[:2]
    return state.strip(), int(restarts)


def wait_for(condition, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Sweep:
    """``python -m crisp.run -m ...`` in the background, its output in a file, as a user's terminal."""

    def __init__(self, cluster: SlurmCluster, out: Path, *overrides: str):
        self.out = out
        self.log_path = out.parent / f"{out.name}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "crisp.run", "-m", *overrides], cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, env={**cluster.env(), "PYTHONUNBUFFERED": "1"})

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def tasks(self, n: int) -> dict[str, str]:
        """Run name -> SLURM task, once the sweep has logged all ``n`` of them."""
        def submitted():
            found = array_tasks(self.log)[1] if "SLURM job" in self.log else {}
            return found if len(found) == n else None

        return wait_for(submitted, 60, "the submission", self.proc)

    def wait(self, timeout_s: float = 300) -> int:
        return self.proc.wait(timeout=timeout_s)


class Writes:
    """Every version of every results.json under a sweep, as seen by polling while the sweep runs."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir, self.seen = sweep_dir, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for path in results.find_all(self.sweep_dir):
                try:
                    mtime, record = path.stat().st_mtime_ns, results.read(path)
                except OSError:
                    continue
                if record:
                    self.seen.setdefault(path.parent.name, {})[mtime] = record["status"]
            time.sleep(0.05)

    def stop(self) -> dict[str, list[str]]:
        """Run name -> the statuses its results.json went through, in order."""
        self._stop.set()
        self._thread.join()
        return {name: [status for _, status in sorted(versions.items())] for name, versions in self.seen.items()}


def test_a_grid_is_one_job_array_with_the_basic_launchers_report(slurm, tmp_path):
    grid = ["sparsity=0,0.8", "seed=1,2"]
    proc = run_crisp("-m", *smoke_overrides(tmp_path / "slurm", *launcher(slurm), sweep=True), *grid,
                     env=slurm.env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    job, tasks = array_tasks(log)
    assert sorted(tasks.values()) == [f"{job}_{i}" for i in range(4)]  # one array, one task per run
    assert {slurm.task_states(job)[task] for task in tasks.values()} == {"COMPLETED"}
    found = records(tmp_path / "slurm")
    assert sorted(found) == sorted(tasks) and all(r["status"] == "completed" for r in found.values())

    basic = run_crisp("-m", *smoke_overrides(tmp_path / "basic", "hydra/launcher=basic", sweep=True), *grid)
    assert basic.returncode == 0, basic.stderr[-3000:]
    assert (tmp_path / "slurm" / "report.csv").read_text() == (tmp_path / "basic" / "report.csv").read_text()
    table = [line for line in (tmp_path / "slurm" / "report.md").read_text().splitlines() if line.startswith("|")]
    assert table == [line for line in (tmp_path / "basic" / "report.md").read_text().splitlines()
                     if line.startswith("|")]
    # readable: accounting off said once, no warnings, a line per task as it is submitted, starts and ends
    assert log.count("SLURM accounting is off") == 1 and "sacct" not in log.replace("(sacct: ", "")
    assert "arning" not in log and "Traceback" not in log
    assert len(log.splitlines()) <= 3 * len(tasks) + 12, log


def test_a_grid_over_any_key_keeps_every_run_in_a_task_and_a_directory_of_its_own(slurm, tmp_path):
    proc = run_crisp("-m", *smoke_overrides(tmp_path, "logger=none", *launcher(slurm), sweep=True),
                     "optim.lr=1e-5,5e-5", "seed=1", env=slurm.env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    found = {r["output_dir"]: r for r in (results.read(p) for p in results.find_all(tmp_path))}
    assert sorted(found) == ["optim.lr=1e-05/dense_seed1", "optim.lr=5e-05/dense_seed1"]
    assert len({r["run_key"] for r in found.values()}) == 2 and all(r["status"] == "completed" for r in found.values())


def test_lockstep_groups_are_array_tasks_and_the_same_command_skips_them(slurm, tmp_path):
    out = tmp_path / "sweep"
    overrides = [*smoke_overrides(out, *launcher(slurm, "hydra.launcher.max_runs_per_group=2", kind="slurm_lockstep"),
                                  sweep=True), "sparsity=0,0.8", "seed=1,2"]
    proc = run_crisp("-m", *overrides, env=slurm.env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    job = re.search(r"SLURM job (\d+): 2 task\(s\)", log).group(1)
    groups = {task: names.split(", ") for task, names in re.findall(r"  task (\S+): (.+)", log)}
    assert sorted(groups) == [f"{job}_0", f"{job}_1"] and all(len(names) == 2 for names in groups.values())
    assert {slurm.task_states(job)[task] for task in groups} == {"COMPLETED"}
    found = records(out)
    assert sorted(found) == ["dense_seed1", "dense_seed2", "uniform_s0.8_seed1", "uniform_s0.8_seed2"]
    assert all(r["status"] == "completed" and r["timing"]["lockstep"]["runs"] == 2 for r in found.values())
    # each group trained in its task's process, as one model
    by_pid: dict[int, set[str]] = {}
    for name, record in found.items():
        by_pid.setdefault(record["environment"]["pid"], set()).add(name)
    assert sorted(map(sorted, by_pid.values())) == sorted(map(sorted, groups.values()))
    assert (out / "report.md").is_file() and "| uniform | 0.8 | 2 |" in proc.stdout
    assert "arning" not in log and "Traceback" not in log

    finished = {name: r["finished_at"] for name, r in found.items()}
    again = run_crisp("-m", *overrides, env=slurm.env())
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert log.count("already completed") == 4 and "SLURM job" not in log  # nothing submitted
    assert {name: r["finished_at"] for name, r in records(out).items()} == finished


def test_a_requeued_task_comes_back_and_only_its_run_trains_again(slurm, tmp_path):
    out = tmp_path / "sweep"
    long = ["data.num_train=2048", "trainer.max_epochs=2"]  # a few seconds of training to be preempted in
    sweep = Sweep(slurm, out, *smoke_overrides(out, *long, *launcher(slurm), sweep=True), "seed=1,2")
    writes = Writes(out)
    tasks = sweep.tasks(2)
    preempted, other = tasks["dense_seed1"], tasks["dense_seed2"]
    wait_for(lambda: "Epoch 0:" in task_log(out, preempted), 120, "dense_seed1 to train", sweep.proc)
    assert results.read(out / "dense_seed1") is None  # mid-training
    slurm.run("scontrol", "requeue", preempted)
    # a task requeued after it completed (and was collected) starts again, finds its run completed with the
    # same run_key and skips it
    wait_for(lambda: "dense_seed2 completed" in sweep.log, 120, "dense_seed2 to complete", sweep.proc)
    slurm.run("scontrol", "requeue", other)
    assert sweep.wait() == 0, sweep.log[-3000:]
    wait_for(lambda: squeue(slurm, other) == ("COMPLETED", 1), 120, "the requeued dense_seed2 to end")
    statuses = writes.stop()

    assert statuses == {"dense_seed1": ["completed"], "dense_seed2": ["completed"]}  # each written once
    assert squeue(slurm, preempted) == ("COMPLETED", 1)
    first, second = task_log(out, preempted).split("Starting with JobEnvironment")[1:]  # two attempts
    assert "Epoch 0:" in first and "dense_seed1: completed" not in first
    assert "dense_seed1: completed" in second
    assert f"task {preempted} (dense_seed1) was requeued (restart 1)" in sweep.log
    ran, skipped = task_log(out, other).split("Starting with JobEnvironment")[1:]
    assert "dense_seed2: completed" in ran and "dense_seed2: already completed" in skipped
    assert "Epoch" not in skipped


def test_a_cancelled_task_is_reported_and_the_same_command_finishes_it(slurm, tmp_path):
    out = tmp_path / "sweep"
    long = ["data.num_train=2048", "trainer.max_epochs=2"]  # a few seconds of training to be cancelled in
    overrides = [*smoke_overrides(out, *long, *launcher(slurm, "hydra.launcher.array_parallelism=3"), sweep=True),
                 "seed=1,2,3"]
    sweep = Sweep(slurm, out, *overrides)
    tasks = sweep.tasks(3)
    wait_for(lambda: "Epoch 0:" in task_log(out, tasks["dense_seed2"]), 120, "dense_seed2 to train", sweep.proc)
    slurm.run("scancel", tasks["dense_seed2"])
    assert sweep.wait() != 0
    assert "crisp: 1 run(s) failed: dense_seed2" in sweep.log
    found = records(out)
    assert found["dense_seed1"]["status"] == "completed" and found["dense_seed3"]["status"] == "completed"
    error = found["dense_seed2"]["error"]
    assert found["dense_seed2"]["status"] == "failed" and error["type"] == "SlurmCancelled"
    assert f"SLURM task {tasks['dense_seed2']} was cancelled" in error["message"]
    assert f"SLURM task {tasks['dense_seed2']} was cancelled" in (out / "report.md").read_text()

    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "dense_seed1" / results.FILENAME,
                                                              out / "dense_seed3" / results.FILENAME)}
    again = run_crisp("-m", *overrides, env=slurm.env())
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    _, resubmitted = array_tasks(log)
    assert list(resubmitted) == ["dense_seed2"]  # only the missing run goes to SLURM
    assert log.count("already completed") == 2
    assert all(r["status"] == "completed" for r in records(out).values()) and len(records(out)) == 3
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == kept


def test_a_task_past_its_time_limit_is_requeued_then_recorded_failed(slurm, tmp_path):
    # a 1-minute limit and a run that needs more: SLURM sends SIGUSR2 signal_delay_s before the limit (20-50 s
    # into the task: slurmctld looks every 30 s), submitit requeues the task once (max_num_timeout=1), and at
    # the second limit it has no requeue left
    out = tmp_path / "sweep"
    limit = launcher(slurm, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=10",
                     "hydra.launcher.max_num_timeout=1")
    proc = run_crisp("-m", *smoke_overrides(out, "trainer.max_epochs=1000", *limit, sweep=True), "seed=1",
                     env=slurm.env(), timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "crisp: 1 run(s) failed: dense_seed1" in log, log[-3000:]
    _, tasks = array_tasks(log)
    task = tasks["dense_seed1"]
    assert f"task {task} (dense_seed1) was requeued (restart 1)" in log
    assert squeue(slurm, task) == ("COMPLETED", 1)  # requeued once, then ended by crisp, not killed
    record = results.read(out / "dense_seed1")
    assert record["status"] == "failed" and record["error"]["type"] == "SlurmTimeLimit", record["error"]
    assert (f"SLURM task {task} reached its time limit (timeout_min=1) and has no requeue left (max_num_timeout=1)"
            in record["error"]["message"])
    assert task_log(out, task).count("Starting with JobEnvironment") == 2


def test_a_requeued_task_resumes_its_run_from_its_checkpoint_and_ends_as_if_never_interrupted(slurm, tmp_path):
    """With checkpointing on, a task requeued (preempted) inside its run's second epoch comes back and trains on
    from the run's last checkpoint: the same history and weights as the run trained without interruption."""
    from safetensors.torch import load_file

    from tests.test_resume import SMALL

    # twice test_resume's rows (32 steps an epoch): a requeue sent on a loaded machine still finds it training
    SMALL = [("data.num_train=1024" if o.startswith("data.num_train=") else o) for o in SMALL]
    reference = run_crisp(*SMALL, f"hydra.run.dir={tmp_path / 'whole'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "sweep"
    sweep = Sweep(slurm, out, *SMALL, *launcher(slurm), f"hydra.sweep.dir={out}", "trainer.checkpoint_every_n_steps=3",
                  "sweep.progress_every_s=1", "seed=1")
    [task] = sweep.tasks(1).values()
    info = out / "dense_seed1" / "checkpoints" / "last.json"

    def inside_second_epoch():
        where = results.read(info) or {}
        return where.get("epoch", 0) >= 1 and where.get("batches", 0) > 0

    wait_for(inside_second_epoch, 600, "a checkpoint inside the second epoch", sweep.proc)
    slurm.run("scontrol", "requeue", task)
    assert sweep.wait(900) == 0, sweep.log[-3000:]
    found = results.read(out / "dense_seed1")
    whole = results.read(tmp_path / "whole")
    assert found["status"] == "completed" and found["resumed_from_step"] > 16
    assert found["history"] == whole["history"] and found["final"] == whole["final"]
    weights, expected = (load_file(out / "dense_seed1" / "model" / "model.safetensors"),
                         load_file(tmp_path / "whole" / "model" / "model.safetensors"))
    for key, tensor in expected.items():
        assert (weights[key] - tensor).abs().max() < 1e-6, key
    assert f"task {task} (dense_seed1) was requeued (restart 1)" in sweep.log
    assert "resuming from" in task_log(out, task).split("Starting with JobEnvironment")[-1]
    # the sweep showed where the task's training was, as it followed the array
    assert re.search(rf"task {task} \(dense_seed1\): 1 run \| epoch [123]/3 \| step \d+/96", sweep.log)
    assert not (out / ".crisp").exists()
