"""What crisp's process launchers share: jobs in, worker tasks run, one JobReturn per job out.

``hydra/launcher=parallel`` makes one task per job; ``hydra/launcher=lockstep`` one task per group
of jobs trained together. Either way a job whose worker dies, stalls or is interrupted is recorded
failed here (:func:`crisp.sweep.jobs.record_failure`) and the sweep goes on; an interrupted sweep
ends its workers, then exits non-zero with a line that says how to resume.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, setup_globals

from crisp.core import results
from crisp.sweep import progress
from crisp.sweep.jobs import Job, job_return, record_failure
from crisp.sweep.pool import Outcome, SweepInterrupted, WorkerPool, WorkerTask, fork_workers, visible_gpus

log = logging.getLogger("crisp")
TASK_DIR = ".crisp"  # per-sweep folder for the launchers' spec, result and heartbeat files
# this sweep's attempt: its task files and group logs are its own, beside those of another sweep into
# the same directory (at the same time, or killed before and now resumed)
ATTEMPT = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def prepare(launcher) -> Path:
    """The sweep's directory, once Hydra's globals and logging are set up as for its own launchers."""
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    progress.configure(launcher.config)
    return sweep_dir


def task(launcher, label: str, kind: str, jobs: list[Job], log_path: Path, **spec: Any) -> WorkerTask:
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    payload = {"kind": kind, "jobs": jobs, "hydra_context": launcher.hydra_context,
               "task_function": launcher.task_function, "singleton_state": Singleton.get_state(), **spec}
    return WorkerTask(label=label, spec=payload, files=sweep_dir / TASK_DIR / ATTEMPT / label, log_path=log_path)


def run_tasks(sweep_dir: Path, tasks: list[WorkerTask], jobs: list[Job], max_running: int,
              stall_timeout_s: float, worker_start: str = "auto") -> list[JobReturn]:
    """Run ``tasks`` (each covering some of ``jobs``); one JobReturn per job, in the jobs' order."""
    returns: dict[int, JobReturn] = {}

    def done(task: WorkerTask, outcome: Outcome) -> None:
        task_jobs: list[Job] = task.spec["jobs"]
        if outcome.error is None:
            returns.update({job.idx: ret for job, ret in zip(task_jobs, outcome.result, strict=True)})
        else:
            kind, message = outcome.error
            for job in task_jobs:
                returns[job.idx] = job_return(job, record_failure(job, kind, message, outcome.log_tail))
        for job in task_jobs:
            log_outcome(job, returns[job.idx].return_value, outcome.seconds)

    pool = WorkerPool(max_running, stall_timeout_s, visible_gpus(), fork=fork_workers(worker_start),
                      progress=progress.ProgressLines())
    log.info("%d jobs in %d worker tasks, at most %d at once", len(jobs), len(tasks), pool.max_running)
    try:
        pool.run(tasks, done)
    except SweepInterrupted as stop:
        log.error("crisp: sweep interrupted by %s: its workers are stopped and their runs recorded failed; "
                  "run the same command with hydra.sweep.dir=%s to finish it", stop, sweep_dir)
        raise SystemExit(143 if str(stop) == "SIGTERM" else 130) from None
    return [returns[job.idx] for job in jobs]


def log_outcome(job: Job, value: dict[str, Any], seconds: float, task: str | None = None) -> None:
    """One line for a run that ended: its folder in the sweep, and its primary metric or its error."""
    name = job.record["output_dir"]  # the run's name, after the keys that vary
    status, also = value.get("status"), f" (task {task})" if task else ""
    again = f" (trained again: {value['retrained']})" if value.get("retrained") else ""
    if status == results.COMPLETED:
        metric = value.get("metric", "val_acc")
        score = (value.get("final") or {}).get(metric)
        log.info("%s completed: %s %s (%s%.0f s)%s", name, metric, "?" if score is None else f"{score:.4f}",
                 f"task {task}, " if task else "", seconds, again)
    elif status == results.FAILED:
        error = value.get("error") or {}
        log.error("%s failed: %s: %s%s%s", name, error.get("type"), error.get("message"), also, again)
    else:
        log.info("%s %s%s", name, status, also)
