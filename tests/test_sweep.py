"""Sweeps: the grid syntax, resume after kill -9, failure isolation, isolation between runs, launchers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from crisp.core import results
from tests.conftest import ROOT, run_crisp, smoke_overrides

pytestmark = pytest.mark.slow


def records(sweep_dir) -> dict[str, dict]:
    return {r["name"]: r for r in (results.read(p) for p in results.find_all(sweep_dir))}


def test_verbatim_grid_and_its_report(tmp_path):
    proc = run_crisp("-m", *smoke_overrides(tmp_path, sweep=True), "sparsity=0,0.6,0.7,0.8", "seed=1,2,3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = records(tmp_path)
    assert len(found) == 12 and all(r["status"] == "completed" for r in found.values())
    assert {"dense_seed1", "uniform_s0.6_seed2", "uniform_s0.8_seed3"} <= set(found)
    assert found["uniform_s0.7_seed1"]["layers"]["configured"] == [0.7, 0.7]
    for name in ("report.md", "report.csv", "report.png"):
        assert (tmp_path / name).stat().st_size > 0 and (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert "| uniform | 0.8 | 3 |" in proc.stdout  # the table is printed when the sweep ends


def test_killed_sweep_resumes_without_touching_finished_runs(tmp_path):
    # run by run (Hydra's basic launcher), so that some runs have finished when it is killed
    grid = [*smoke_overrides(tmp_path, "hydra/launcher=basic", sweep=True), "seed=1,2,3,4"]
    argv = [sys.executable, "-m", "crisp.run", "-m", *grid]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(results.find_all(tmp_path)) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in results.find_all(tmp_path)}
    assert 2 <= len(finished) < 4
    again = run_crisp("-m", *grid)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already completed") + again.stdout.count("already completed") == len(finished)
    for path, (content, mtime) in finished.items():
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime
    found = records(tmp_path)
    assert sorted(found) == [f"dense_seed{i}" for i in (1, 2, 3, 4)]
    assert all(r["status"] == "completed" for r in found.values())
    assert not list(tmp_path.rglob(".crisp.lock"))


@pytest.mark.parametrize("launcher", ["auto", "basic", "lockstep"])
def test_a_failing_run_does_not_stop_the_sweep(tmp_path, launcher):
    good, bad = tmp_path / "good", tmp_path / "bad"  # bad: its labels are not SST-2's, found when it loads
    for folder, label in ((good, 1), (bad, 7)):
        folder.mkdir()
        for file in ("train.tsv", "dev.tsv"):
            rows = [f"{'good' if i % 2 else 'bad'} film {i}\t{label if i == 3 else i % 2}" for i in range(40)]
            (folder / file).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    grid = [*smoke_overrides(tmp_path / "sweep", "data=sst2_local", f"hydra/launcher={launcher}", sweep=True),
            f"data.dir={good},{bad}"]
    proc = run_crisp("-m", *grid)
    assert proc.returncode != 0
    folder = {kind: "data.dir=" + str(path).strip("/").replace("/", "_") + "/dense_seed1"
              for kind, path in (("good", good), ("bad", bad))}
    assert f"1 run(s) failed: {folder['bad']}" in proc.stderr
    found = {r["output_dir"]: r for r in (results.read(p) for p in results.find_all(tmp_path / "sweep"))}
    assert found[folder["good"]]["status"] == "completed"
    failed = found[folder["bad"]]
    assert failed["status"] == "failed" and "train.tsv:5: label='7' is not allowed" in failed["error"]["message"]
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "dense_seed1" in report and "label='7' is not allowed" in report


def test_a_bad_value_in_a_grid_stops_it_before_any_run_under_every_launcher(tmp_path):
    for launcher in ("basic", "lockstep", "parallel", "auto", "slurm"):  # slurm: refused before any sbatch
        out = tmp_path / launcher
        proc = run_crisp("-m", *smoke_overrides(out, f"hydra/launcher={launcher}", sweep=True), "sparsity=0,1.5")
        assert proc.returncode == 2, (launcher, proc.stderr[-2000:])
        assert "job 1 of the grid (" in proc.stderr and "sparsity=1.5 is not allowed" in proc.stderr
        assert not out.exists()  # nothing written, nothing trained


def test_runs_in_one_process_are_independent(tmp_path):
    env = {k: None for k in ("WANDB_API_KEY", "WANDB_MODE")}
    proc = run_crisp("-m", *smoke_overrides(tmp_path / "sweep", "logger=wandb", "hydra/launcher=basic", sweep=True),
                     "seed=1,2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb sync" in proc.stdout  # offline by itself, and says how to upload
    found = records(tmp_path / "sweep")
    ids = {r["wandb"]["id"] for r in found.values()}
    assert len(ids) == 2 and all(r["wandb"]["mode"] == "offline" for r in found.values())
    assert len({r["environment"]["pid"] for r in found.values()}) == 1  # really one process
    alone = run_crisp(*smoke_overrides(tmp_path / "alone", "seed=2", "logger=none"))
    assert alone.returncode == 0
    assert results.read(tmp_path / "alone")["history"] == found["dense_seed2"]["history"]


def test_local_launcher_runs_each_job_in_its_own_process(tmp_path):
    proc = run_crisp("-m", *smoke_overrides(tmp_path, sweep=True), "hydra/launcher=local", "seed=1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = records(tmp_path)
    assert len(found) == 2 and all(r["status"] == "completed" for r in found.values())
    assert len({r["environment"]["pid"] for r in found.values()}) == 2


def test_ddp_inside_a_sweep(tmp_path):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    proc = run_crisp("-m", *smoke_overrides(tmp_path, *ddp, sweep=True), "seed=1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = records(tmp_path)
    assert sorted(found) == ["dense_seed1", "dense_seed2"]  # no sweep re-launched inside a rank
    assert all(r["status"] == "completed" for r in found.values())
    for name in found:
        assert len(list((tmp_path / name).rglob("results.json"))) == 1
        assert len(list((tmp_path / name).rglob("metrics.csv"))) == 1  # one logger run, from rank 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["dense_seed1", "dense_seed2"]


# ---------------------------------------------------------------------------------------------- worker processes


def workers_of(sweep_dir) -> list[int]:
    """Pids of live worker processes of this sweep (and their children): their output goes to a log in it."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            out = os.readlink(f"/proc/{entry}/fd/1")
        except (OSError, ValueError):
            continue
        if out.startswith(str(sweep_dir)) and entry.isdigit():
            pids.append(int(entry))
    return pids


def start_sweep(sweep_dir, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "crisp.run", "-m", *smoke_overrides(sweep_dir, "hydra/launcher=parallel", *extra,
                                                                      sweep=True)]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.parametrize("start", ["auto", "exec"])  # auto forks the workers (Linux); exec: fresh interpreters
def test_parallel_runs_each_job_in_a_process_that_ends_with_it(tmp_path, start):
    proc = run_crisp("-m", *smoke_overrides(tmp_path, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                                            f"hydra.launcher.worker_start={start}", sweep=True), "seed=1,2,3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = records(tmp_path)
    assert len(found) == 3 and all(r["status"] == "completed" for r in found.values())
    assert len({r["environment"]["pid"] for r in found.values()}) == 3
    assert "dense_seed2 completed: val_acc" in proc.stdout  # one line per run, not three progress bars
    assert (tmp_path / "dense_seed2" / "worker.log").stat().st_size > 0
    assert not workers_of(tmp_path)
    assert not (tmp_path / ".crisp").exists()  # the workers' specs and results go once collected


@pytest.mark.parametrize(("launcher", "setting", "said"), [
    ("parallel", "worker_start=spawn", "worker_start='spawn' is not allowed: use one of auto, fork, exec"),
    ("lockstep", "worker_start=thread", "worker_start='thread' is not allowed: use one of auto, fork, exec"),
    ("lockstep", "pack_workers=-1", "pack_workers=-1 is not allowed: use auto or a number of processes >= 0"),
    ("auto", "stall_timeout_s=0", "stall_timeout_s=0 is not allowed: a number of seconds > 0"),
    ("parallel", "stall_timeout_s=-5", "stall_timeout_s=-5 is not allowed: a number of seconds > 0"),
    ("parallel", "n_jobs=0", "n_jobs=0 is not allowed: a whole number of runs at once >= 1"),
    ("lockstep", "max_runs_per_group=0", "max_runs_per_group=0 is not allowed: use auto, null"),
    ("auto", "row_width=0", "row_width=0 is not allowed: a whole number of tokens >= 1"),
    ("lockstep", "row_width=wide", "row_width='wide' is not allowed: a whole number of tokens >= 1"),
    ("local", "timeout_min=0", "timeout_min=0 is not allowed: a number of minutes > 0"),
    ("local", "tasks_per_node=2", "tasks_per_node=2 is not allowed: 1: one process per run"),
    ("local", "mem_gb=4", "mem_gb=4 is not allowed: null: submitit's local mode does not limit a run's memory"),
    ("slurm", "poll_s=0", "poll_s=0.0 is not allowed: a number of seconds > 0"),
    ("slurm", "array_parallelism=0", "array_parallelism=0 is not allowed: a whole number of tasks at once >= 1"),
    ("slurm_lockstep", "row_width=0", "row_width=0 is not allowed: a whole number of tokens >= 1"),
    ("parallel", "+hydra.launcher.n_job=2", "n_job=2 is not allowed: it is not a setting of this launcher"),
])
def test_a_bad_launcher_setting_fails_before_anything_is_written(tmp_path, launcher, setting, said):
    override = setting if setting.startswith("+") else f"hydra.launcher.{setting}"
    proc = run_crisp("-m", *smoke_overrides(tmp_path, f"hydra/launcher={launcher}", override, sweep=True), "seed=1,2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()  # one line: the key, the value and what is allowed
    assert len(lines) == 1 and lines[0].startswith(f"crisp: error: hydra.launcher.{said}"), proc.stderr[-2000:]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("launcher", ["lockstep", "parallel"])
def test_a_grid_with_a_job_that_cannot_be_composed_fails_before_any_run_starts(tmp_path, launcher):
    grid = smoke_overrides(tmp_path, f"hydra/launcher={launcher}", sweep=True)
    proc = run_crisp("-m", *grid, "model=tiny,nonexistent")
    assert proc.returncode == 2  # Hydra's own config error, said as crisp's: one line
    assert "model=nonexistent is not allowed: choose one of " in proc.stderr, proc.stderr[-2000:]
    assert not results.find_all(tmp_path) and not list(tmp_path.glob("*/.hydra"))


def test_a_worker_that_stops_answering_is_ended_and_the_sweep_reports_it(tmp_path):
    proc = start_sweep(tmp_path, "hydra.launcher.n_jobs=2", "hydra.launcher.stall_timeout_s=20", "seed=1,2,3")
    lock = tmp_path / "dense_seed1" / ".crisp.lock"
    wait_for(lock.exists)
    victim = int(lock.read_text().split()[1])
    os.kill(victim, signal.SIGSTOP)  # alive, but no progress: a hung CUDA call looks the same from outside
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "1 run(s) failed: dense_seed1" in stderr and "dense_seed1 failed: Stalled" in stdout
    found = records(tmp_path)
    assert found["dense_seed1"]["status"] == "failed" and found["dense_seed1"]["error"]["type"] == "Stalled"
    assert "showed no progress for" in found["dense_seed1"]["error"]["message"]
    assert found["dense_seed2"]["status"] == found["dense_seed3"]["status"] == "completed"
    assert "Stalled" in (tmp_path / "report.md").read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)
    assert not workers_of(tmp_path) and not list(tmp_path.rglob(".crisp.lock"))
    assert not (tmp_path / ".crisp").exists()


def test_sigterm_ends_the_workers_and_records_their_runs(tmp_path):
    proc = start_sweep(tmp_path, "hydra.launcher.n_jobs=2", "trainer.max_epochs=30", "seed=1,2,3")
    wait_for(lambda: len(workers_of(tmp_path)) == 2 and len(list(tmp_path.rglob(".crisp.lock"))) == 2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "sweep interrupted by SIGTERM" in stdout and f"hydra.sweep.dir={tmp_path}" in stdout
    assert not workers_of(tmp_path)
    assert all(stdout.count(f"dense_seed{seed} failed: Interrupted") == 1 for seed in (1, 2, 3))  # said once each
    found = records(tmp_path)
    assert {r["error"]["type"] for r in found.values()} == {"Interrupted"}  # running and not yet started
    assert len(found) == 3
    assert not (tmp_path / ".crisp").exists()


def test_workers_die_with_a_sweep_killed_outright(tmp_path):
    proc = start_sweep(tmp_path, "hydra.launcher.n_jobs=2", "trainer.max_epochs=30", "seed=1,2")
    wait_for(lambda: len(workers_of(tmp_path)) == 2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep's own process group: the workers are in their own
    proc.communicate()
    wait_for(lambda: not workers_of(tmp_path), timeout=10)


def test_a_big_sweep_composes_its_jobs_in_forked_processes_exactly_as_one_by_one(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import JobRuntime
    from hydra.types import HydraContext
    from omegaconf import OmegaConf

    from crisp.core.config import register_configs, register_resolvers
    from crisp.sweep import jobs as sweep_jobs

    register_configs()
    register_resolvers()
    overrides = [[f"seed={seed}", f"sparsity={s}", f"strategy={strategy}"]
                 for seed in (1, 2) for s in (0, 0.8) for strategy in ("uniform", "adaptive")]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3", job_name="run"):
        JobRuntime.instance().set("name", "run")
        master = compose("config", overrides=["experiment=smoke", f"hydra.sweep.dir={tmp_path}"],
                         return_hydra_config=True)
        master.hydra.job.config_name = "config"
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=None)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
        here = []  # jobs composed in this process
        compose_one = sweep_jobs.job_config
        monkeypatch.setattr(sweep_jobs, "job_config", lambda *args: here.append(args) or compose_one(*args))
        forked = sweep_jobs.job_configs(context, master, overrides, 5)
        assert not here
        monkeypatch.setattr(sweep_jobs, "JOBS_PER_PROCESS", len(overrides) + 1)  # one by one, in this process
        alone = sweep_jobs.job_configs(context, master, overrides, 5)
        assert len(here) == len(overrides)
    assert [OmegaConf.to_container(c) for c in forked] == [OmegaConf.to_container(c) for c in alone]
    assert [(c.seed, c.sparsity, c.strategy.name, c.hydra.job.num) for c in forked] == \
        [(int(o[0][5:]), float(o[1][9:]), o[2][9:], 5 + i) for i, o in enumerate(overrides)]


# ------------------------------------------------------------------------------------- nothing lost, nothing mixed


@pytest.mark.parametrize("launcher", ["basic", "parallel", "lockstep", "auto"])
def test_a_grid_over_any_key_keeps_every_run_in_a_directory_of_its_own(tmp_path, launcher):
    proc = run_crisp("-m", *smoke_overrides(tmp_path, "logger=none", f"hydra/launcher={launcher}", sweep=True),
                     "optim.lr=1e-5,5e-5", "seed=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {r["output_dir"]: r for r in (results.read(p) for p in results.find_all(tmp_path))}
    assert sorted(found) == ["optim.lr=1e-05/dense_seed1", "optim.lr=5e-05/dense_seed1"]
    assert len({r["run_key"] for r in found.values()}) == 2 and all(r["status"] == "completed" for r in found.values())
    assert {r["config"]["optim"]["lr"] for r in found.values()} == {1e-5, 5e-5}
    report = (tmp_path / "report.md").read_text()
    assert "## sst2 (synthetic) · tiny DistilBERT, random init · optim.lr=1e-05" in report
    assert "· optim.lr=5e-05" in report  # a table each, never pooled


def test_a_name_given_to_a_grid_labels_its_runs_and_overwrites_none(tmp_path):
    proc = run_crisp("-m", *smoke_overrides(tmp_path, "logger=none", sweep=True), "sparsity=0,0.8", "name=myexp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {r["output_dir"]: r for r in (results.read(p) for p in results.find_all(tmp_path))}
    assert sorted(found) == ["dense_seed1", "uniform_s0.8_seed1"] and {r["name"] for r in found.values()} == {"myexp"}


@pytest.mark.parametrize("override", ["name=../../escape", "hydra.sweep.subdir=../x", "hydra.sweep.subdir=/tmp/x"])
def test_a_path_like_override_cannot_write_outside_the_sweep(tmp_path, override):
    sweep = tmp_path / "a" / "sweep"
    proc = run_crisp("-m", *smoke_overrides(sweep, "logger=none", sweep=True), override, "seed=1,2")
    assert proc.returncode == 2 and "is not allowed" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "a").exists() and not (tmp_path / "escape").exists()


def test_two_lockstep_sweeps_into_one_directory_train_each_run_once(tmp_path):
    overrides = smoke_overrides(tmp_path, "logger=none", "hydra/launcher=lockstep", "trainer.max_epochs=2", sweep=True)
    grid = [sys.executable, "-m", "crisp.run", "-m", *overrides, "seed=1,2,3"]
    first = subprocess.Popen(grid, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(grid, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == second.returncode == 0, outputs
    found = records(tmp_path)
    assert sorted(found) == ["dense_seed1", "dense_seed2", "dense_seed3"]
    assert all(r["status"] == "completed" for r in found.values())
    trained = sum(out.count(" completed: val_acc") for out, _ in outputs)
    assert trained == 3  # each run once, by one of the two; the other skipped it
    assert not (tmp_path / ".crisp").exists() and not list(tmp_path.rglob(".crisp.lock"))


def test_a_zero_group_size_is_refused_before_anything_is_written(tmp_path):
    proc = run_crisp("-m", *smoke_overrides(tmp_path, "hydra/launcher=lockstep", "hydra.launcher.max_runs_per_group=0",
                                            sweep=True), "seed=1,2")
    assert proc.returncode != 0
    assert "hydra.launcher.max_runs_per_group=0 is not allowed" in proc.stderr, proc.stderr[-2000:]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ folders it cannot write


def cannot_write(folder) -> list[str]:
    """A command prefix under which ``folder`` cannot be written: as root (who writes anywhere), a read-only
    bind mount of it in a mount namespace of its own; as anyone else, its write permission taken away."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("running as root without unshare(1) and a mount namespace: nothing here is read-only to root")
    return ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"',
            str(folder)]


@pytest.mark.parametrize("where", ["sweep folder", "run folder", "file in place of a folder"])
def test_a_folder_it_cannot_write_is_one_line_and_exit_code_2(tmp_path, where):
    sweep, prefix = tmp_path / "sweep", []
    if where == "sweep folder":
        (tmp_path / "ro").mkdir()
        sweep, prefix = tmp_path / "ro" / "sweep", cannot_write(tmp_path / "ro")
    elif where == "run folder":  # a run's folder left read-only by an earlier sweep
        (sweep / "dense_seed1").mkdir(parents=True)
        prefix = cannot_write(sweep / "dense_seed1")
    else:
        (tmp_path / "a-file").write_text("not a folder\n")
        sweep = tmp_path / "a-file" / "sweep"
    argv = [*prefix, sys.executable, "-m", "crisp.run", "-m", *smoke_overrides(sweep, sweep=True), "seed=1,2"]
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        for folder in (tmp_path / "ro", sweep / "dense_seed1"):
            if folder.is_dir():
                folder.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = {"sweep folder": f"hydra.sweep.dir={sweep} cannot be written: {tmp_path / 'ro'} ",
            "run folder": f"the run folder {sweep / 'dense_seed1'} (job 0: ",
            "file in place of a folder": f"hydra.sweep.dir={sweep} cannot be written: {tmp_path / 'a-file'} is a "
                                         "file, not a folder"}[where]
    assert lines[0].startswith(f"crisp: error: {said}"), lines
    if where != "file in place of a folder":  # which permission: a read-only file system (root), or the mode
        assert lines[0].endswith("is on a read-only file system") or "permission denied" in lines[0], lines
    assert not (sweep / "multirun.yaml").exists() and not results.find_all(tmp_path)


# -------------------------------------------------------- hydra/launcher=local: its processes end with the sweep


def end_group(proc: subprocess.Popen) -> None:
    """SIGKILL a sweep started in a session of its own, and every process in its group (a test that failed
    must not leave it training)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def processes_of(sweep_dir, but: tuple[int, ...] = ()) -> list[str]:
    """Live processes whose command line names the sweep's folder, as ``ps`` lists them: submitit's controllers
    and jobs name their folder in <sweep>/.submitit."""
    listed = subprocess.run(["ps", "-ww", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in listed.splitlines() if str(sweep_dir) in line and int(line.split()[0]) not in but
            and not line.split()[1].startswith("Z")]


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C", "kill -9"])
def test_the_local_launchers_processes_end_with_the_sweep(tmp_path, stop):
    sweep = tmp_path / "sweep"
    argv = [sys.executable, "-m", "crisp.run", "-m", *smoke_overrides(sweep, "hydra/launcher=local",
                                                                      "trainer.max_epochs=40", sweep=True), "seed=1,2"]
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: len(list(sweep.rglob(".crisp.lock"))) == 2, timeout=300)  # both runs are training
        assert len(processes_of(sweep, but=(proc.pid,))) == 4  # a submitit controller and a job's process per run
        signalled = time.monotonic()
        if stop == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        elif stop == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: the whole foreground process group
        else:
            proc.kill()
        proc.wait(timeout=60)
        while processes_of(sweep, but=(proc.pid,)) and time.monotonic() - signalled < 10:
            time.sleep(0.2)
        assert not processes_of(sweep, but=(proc.pid,)), "a process of the sweep is alive 10 s after it was stopped"
    finally:
        end_group(proc)
    output = (tmp_path / "sweep.log").read_text()
    if stop == "kill -9":
        assert proc.returncode == -signal.SIGKILL
        return
    assert proc.returncode == {"SIGTERM": 143, "Ctrl-C": 130}[stop], output[-3000:]
    signame = {"SIGTERM": "SIGTERM", "Ctrl-C": "SIGINT"}[stop]
    assert f"sweep interrupted by {signame}" in output and f"hydra.sweep.dir={sweep} to finish it" in output
    found = records(sweep)
    assert sorted(found) == ["dense_seed1", "dense_seed2"]
    assert {r["error"]["type"] for r in found.values()} == {"Interrupted"}
    assert not list(sweep.rglob(".crisp.lock"))


def test_a_sweep_whose_runs_another_sweep_is_training_waits_for_them_and_reports_them(tmp_path):
    """The same command run again while the first still trains: it says which process holds each run, waits,
    and reports them; it never exits 0 with an empty report."""
    sweep = tmp_path / "sweep"
    grid = [*smoke_overrides(sweep, "hydra/launcher=local", "trainer.max_epochs=12", sweep=True), "seed=1,2"]
    first = subprocess.Popen([sys.executable, "-m", "crisp.run", "-m", *grid], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        locks = [sweep / f"dense_seed{seed}" / ".crisp.lock" for seed in (1, 2)]
        wait_for(lambda: all(lock.exists() for lock in locks), timeout=300)
        holders = [lock.read_text().split() for lock in locks]
        second = run_crisp("-m", *grid, timeout=900)
        first_output, _ = first.communicate(timeout=900)
    finally:
        end_group(first)
    assert first.returncode == 0, first_output[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 run(s) of this sweep are being trained by another process" in second.stdout, second.stdout[-3000:]
    for seed, (host, pid, _) in zip((1, 2), holders, strict=True):
        assert f"dense_seed{seed}: process {pid} on {host}" in second.stdout
    assert "| dense | 0 | 2 |" in second.stdout  # its report holds both runs, trained by the first sweep
    assert all(r["status"] == "completed" for r in records(sweep).values())


def test_a_held_run_is_waited_for_and_one_whose_holder_died_without_a_result_is_recorded_failed(tmp_path, caplog):
    from hydra.core.utils import JobReturn, JobStatus

    from crisp.sweep.held import settle
    from crisp.sweep.jobs import Job

    holders, jobs = [], []
    for name in ("finishes", "dies"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        holder = subprocess.Popen(["sleep", "60"])
        (run_dir / ".crisp.lock").write_text(f"{socket.gethostname()} {holder.pid} -")
        record = {"run_key": f"key-{name}", "name": name, "output_dir": name, "schema": 1}
        holders.append(holder)
        jobs.append(Job(len(jobs), [], None, run_dir, record, tmp_path))
    skipped = [JobReturn(status=JobStatus.COMPLETED, _return_value={**job.record, "status": "skipped"}) for job in jobs]

    def the_other_process() -> None:
        time.sleep(1)
        results.write_atomic(jobs[0].output_dir / "results.json", {**jobs[0].record, "status": "completed"})
        for holder in holders:  # the first let go once its run was recorded; the second was killed
            holder.kill()
            holder.wait()

    other = threading.Thread(target=the_other_process)
    other.start()
    with caplog.at_level("INFO", logger="crisp"):
        settle(jobs, skipped, poll_s=0.1)
    other.join()
    said = caplog.text
    assert "2 run(s) of this sweep are being trained by another process" in said
    assert f"finishes: process {holders[0].pid} on {socket.gethostname()}" in said
    assert results.read(jobs[0].output_dir)["status"] == "completed"
    died = results.read(jobs[1].output_dir)
    assert died["status"] == "failed" and died["error"]["type"] == "NotTrained"
    assert "ended without recording it" in died["error"]["message"]


def test_a_run_whose_results_json_cannot_be_read_is_trained_again_and_says_so(tmp_path):
    grid = [*smoke_overrides(tmp_path, "logger=none", sweep=True), "seed=1,2"]
    assert run_crisp("-m", *grid).returncode == 0
    (tmp_path / "dense_seed1" / "results.json").write_text('{"schema": 1, "status": "compl')
    untouched = (tmp_path / "dense_seed2" / "results.json").read_bytes()
    again = run_crisp("-m", *grid)
    assert again.returncode == 0, again.stderr[-3000:]
    line = next(line for line in again.stdout.splitlines() if "dense_seed1 completed" in line)
    assert "(trained again: its previous results.json could not be read (JSONDecodeError" in line
    record = results.read(tmp_path / "dense_seed1")
    assert record["status"] == "completed"
    assert record["retrained"].startswith("its previous results.json could not be read (JSONDecodeError")
    assert (tmp_path / "dense_seed2" / "results.json").read_bytes() == untouched
