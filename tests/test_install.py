"""crisp installed from its wheel, as a user installs it: the commands run from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import pytest

from crisp.core import results
from tests.conftest import ROOT


@pytest.mark.slow
def test_the_wheel_runs_a_smoke_sweep_and_its_report_from_another_folder(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "Warning" not in built.stderr, built.stderr[-3000:]  # setuptools says nothing about the project
    (wheel,) = wheels.glob("crisp_attention-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    # its dependencies from this environment (a .pth entry: the editable crisp there is not seen)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "crisp-deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"WANDB_SILENT": "true"}
    where = subprocess.run([str(python), "-c", "import crisp; print(crisp.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(site)  # the wheel's crisp, not the checkout's
    sweep = tmp_path / "sweep"
    run = subprocess.run([str(venv / "bin" / "crisp-run"), "-m", "experiment=smoke", "data.num_train=128",
                          "data.num_val=64", "trainer.max_epochs=1", "sparsity=0,0.8", f"hydra.sweep.dir={sweep}"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.parent.name for p in results.find_all(sweep)) == ["dense_seed1", "uniform_s0.8_seed1"]
    report = subprocess.run([str(venv / "bin" / "crisp-report"), str(sweep), "--out", str(tmp_path / "report")],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| uniform | 0.8 | 1 |" in report.stdout and (tmp_path / "report" / "report.md").is_file()
    assert not list(elsewhere.iterdir())  # nothing written where the commands ran
