"""sweep.mps: a private MPS daemon around a sweep, found by the runs through the environment.

The real daemon needs an NVIDIA driver; these tests put a stand-in ``nvidia-cuda-mps-control`` on
PATH that records how it was called.
"""

from __future__ import annotations

import os
import stat

import pytest

from crisp import results
from crisp.sweep import mps
from tests.conftest import run_crisp, smoke_overrides

FAKE = """#!/bin/sh
# records: the arguments, the pipe folder it was given, and what came on stdin for "quit"
if [ "$1" = "-d" ]; then echo "start $CUDA_MPS_PIPE_DIRECTORY" >> "$MPS_LOG"
else read line; echo "$line $CUDA_MPS_PIPE_DIRECTORY" >> "$MPS_LOG"; fi
"""


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = bin_dir / mps.CONTROL
    control.write_text(FAKE)
    control.chmod(control.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "mps.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MPS_LOG", str(log))
    return log


def test_daemon_starts_with_a_private_pipe_and_stops(fake_control, monkeypatch):
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    with mps.daemon():
        pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
        assert os.path.isdir(pipe) and os.environ["CUDA_MPS_LOG_DIRECTORY"] == pipe
    assert fake_control.read_text().splitlines() == [f"start {pipe}", f"quit {pipe}"]
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not os.path.exists(pipe)


def test_a_daemon_crisp_did_not_start_is_left_alone(fake_control, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")  # the system's own
    mps.stop()
    assert not fake_control.exists() and os.environ["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/nvidia-mps"


def test_missing_control_names_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(mps.MPSError, match=r"sweep.mps=true needs nvidia-cuda-mps-control.*sweep.mps=false"):
        mps.start()


def test_a_sweep_runs_inside_the_daemon(fake_control, tmp_path):
    out = tmp_path / "sweep"
    proc = run_crisp("-m", *smoke_overrides(out, "sweep.mps=true", "data.num_train=64", sweep=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = fake_control.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["start", "quit"]
    assert lines[0].split()[1] == lines[1].split()[1]  # stopped the daemon it started
    record = results.read(out / "dense_seed1")
    assert record["status"] == results.COMPLETED
    # a scheduling choice: the same run with or without MPS is the same run for resume
    config = record["config"]
    assert config["sweep"]["mps"] is True
    assert record["run_key"] == results.run_key({**config, "sweep": {"mps": False}})


def test_a_sweep_without_the_daemon_stops_before_any_run(tmp_path):
    out = tmp_path / "sweep"
    # an empty PATH: no nvidia-cuda-mps-control (python itself is started by its full path)
    proc = run_crisp("-m", *smoke_overrides(out, "sweep.mps=true", sweep=True), env={"PATH": str(tmp_path)})
    assert proc.returncode != 0
    assert "sweep.mps=true needs nvidia-cuda-mps-control" in proc.stderr
    assert not list(out.rglob("results.json"))
