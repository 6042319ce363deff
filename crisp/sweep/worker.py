"""A sweep worker: :func:`main` in a process forked from the sweep's (by :mod:`crisp.sweep.pool`), or
``python -m crisp.sweep.worker SPEC RESULT`` in a fresh interpreter (``hydra.launcher.worker_start=exec``).

It runs the jobs in the pickled spec, in this process of its own, the way Hydra's own launchers run a job
(``hydra.core.utils.run_job``): one after another (``kind: jobs``), or as one lockstep group
(``kind: lockstep``). It writes the list of JobReturns to RESULT and exits, so that its GPU context
goes with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

import cloudpickle

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Get SIGKILL when the sweep's process dies, even by SIGKILL (Linux); exit if it already has."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = os.environ.get("CRISP_SWEEP_PID")
    if parent and os.getppid() != int(parent):
        os._exit(1)  # the sweep died before the line above took effect


# what each kind of task imports: a forked worker finds it imported by the sweep's process already
PRELOAD = {"jobs": "crisp.training.train", "lockstep": "crisp.sweep.group_task"}


def preload(kind: str) -> None:
    import importlib

    importlib.import_module(PRELOAD[kind])


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    _die_with_parent()
    from hydra.core.singleton import Singleton
    from hydra.core.utils import setup_globals

    from crisp.core import heartbeat
    from crisp.sweep.jobs import execute

    spec = cloudpickle.loads(Path(spec_path).read_bytes())
    setup_globals()
    Singleton.set_state(spec["singleton_state"])
    heartbeat.beat(force=True)
    if spec["kind"] == "jobs":
        returns = [execute(spec["hydra_context"], job, spec["task_function"]) for job in spec["jobs"]]
    elif spec["kind"] == "lockstep":
        from crisp.sweep.group_task import run_group

        returns = run_group(spec["hydra_context"], spec["jobs"], spec["options"])
    else:
        raise ValueError(f"unknown task kind {spec['kind']!r}")
    tmp = Path(f"{result_path}.tmp")
    tmp.write_bytes(cloudpickle.dumps(returns))
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
