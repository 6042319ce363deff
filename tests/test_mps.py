"""sweep.mps: a private MPS daemon around a sweep, stopped after the report, never left behind.

The real daemon needs an NVIDIA driver (tests/test_cuda.py runs it on a GPU); these tests put a
stand-in ``nvidia-cuda-mps-control`` on PATH that records how it was called, and whether the
sweep's report and worker processes existed at that moment.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile

import pytest

from crisp.core import results
from crisp.sweep import nvidia_mps as mps
from tests.conftest import run_crisp, smoke_overrides

FAKE = """#!/bin/sh
# records: what it was asked, its pipe folder, and for "quit" whether the report and workers existed
if [ "$1" = "-d" ]; then echo "start $CUDA_MPS_PIPE_DIRECTORY" >> "$MPS_LOG"; exit 0; fi
read line
report=no; [ -f "$MPS_REPORT" ] && report=yes
workers=0  # processes whose output goes to a log in the sweep's folder
for fd in /proc/[0-9]*/fd/1; do case "$(readlink "$fd")" in "$MPS_SWEEP"*) workers=$((workers + 1));; esac; done
echo "$line $CUDA_MPS_PIPE_DIRECTORY report=$report workers=$workers" >> "$MPS_LOG"
"""


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = bin_dir / mps.CONTROL
    control.write_text(FAKE)
    control.chmod(control.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "mps.log"
    temp = tmp_path / "tmp"  # where daemons' pipe folders go: this test's own
    temp.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MPS_LOG", str(log))
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    return log


def test_daemon_starts_with_a_private_pipe_and_stops(fake_control):
    with mps.daemon():
        pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
        assert os.path.isdir(pipe) and os.environ["CUDA_MPS_LOG_DIRECTORY"] == pipe
    lines = fake_control.read_text().splitlines()
    assert lines[0] == f"start {pipe}" and lines[1].startswith(f"quit {pipe} ")
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not os.path.exists(pipe)


def test_a_daemon_crisp_did_not_start_is_left_alone(fake_control, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")  # the system's own
    mps.stop()
    assert not fake_control.exists() and os.environ["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/nvidia-mps"


def test_a_daemon_whose_sweep_died_is_stopped_by_the_next(fake_control, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tempfile.mkdtemp(prefix=mps.PREFIX)
    with open(os.path.join(abandoned, "owner"), "w") as f:
        f.write(f"{os.uname().nodename} {int(dead.stdout)}\n")
    in_use = tempfile.mkdtemp(prefix=mps.PREFIX)  # a live sweep's (this process): not touched
    with open(os.path.join(in_use, "owner"), "w") as f:
        f.write(f"{os.uname().nodename} {os.getpid()}\n")
    assert mps.stop_abandoned() == [abandoned]
    assert "left by an earlier sweep" in caplog.text
    assert fake_control.read_text().startswith(f"quit {abandoned} ")
    assert not os.path.exists(abandoned) and os.path.isdir(in_use)


def test_missing_control_names_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(mps.MPSError, match=r"sweep.mps=true needs nvidia-cuda-mps-control.*sweep.mps=false"):
        mps.start()


@pytest.mark.slow
def test_a_sweep_stops_the_daemon_after_its_report_and_its_workers(fake_control, tmp_path):
    out = tmp_path / "sweep"
    env = {"MPS_REPORT": str(out / "report.md"), "MPS_SWEEP": str(out)}
    proc = run_crisp("-m", *smoke_overrides(out, "sweep.mps=true", "data.num_train=64", "hydra/launcher=parallel",
                                            "hydra.launcher.n_jobs=2", sweep=True), "seed=1,2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start, quit_ = fake_control.read_text().splitlines()
    assert start.split()[0] == "start" and quit_.split()[:2] == ["quit", start.split()[1]]  # its own daemon
    assert quit_.split()[2:] == ["report=yes", "workers=0"]  # the order that cannot hang
    records = [results.read(p) for p in results.find_all(out)]
    assert len(records) == 2 and all(r["status"] == results.COMPLETED for r in records)
    # a scheduling choice: the same run with or without MPS is the same run for resume
    config = records[0]["config"]
    assert config["sweep"]["mps"] is True
    assert records[0]["run_key"] == results.run_key({**config, "sweep": {"mps": False}})


def test_a_sweep_without_the_daemon_stops_before_any_run(tmp_path):
    out = tmp_path / "sweep"
    # an empty PATH: no nvidia-cuda-mps-control (python itself is started by its full path)
    proc = run_crisp("-m", *smoke_overrides(out, "sweep.mps=true", "hydra/launcher=parallel", sweep=True),
                     env={"PATH": str(tmp_path)})
    assert proc.returncode != 0
    assert "sweep.mps=true needs nvidia-cuda-mps-control" in proc.stderr
    assert not list(out.rglob("results.json"))


def test_mps_with_a_launcher_that_runs_jobs_in_the_sweep_process_is_refused(fake_control, tmp_path):
    proc = run_crisp("-m", *smoke_overrides(tmp_path / "sweep", "sweep.mps=true", "hydra/launcher=basic", sweep=True))
    assert proc.returncode != 0
    assert "sweep.mps=true is not allowed with the launcher" in proc.stderr
    assert "hydra/launcher=lockstep or hydra/launcher=parallel" in proc.stderr
    assert not fake_control.exists()  # nothing started


def test_mps_in_a_single_run_is_refused_before_it_trains(tmp_path):
    proc = run_crisp(*smoke_overrides(tmp_path / "run", "sweep.mps=true"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "crisp: error: sweep.mps=true is not allowed in a single run" in proc.stderr
    assert not list(tmp_path.rglob("results.json"))
