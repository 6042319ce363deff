"""``hydra/launcher=local``: every run in a process of its own on this machine (submitit's local mode),
ended with the sweep.

submitit starts each job as a controller process (``submitit.local._local``) that starts the job's own
process. Hydra's launcher for it only waits on the results: a sweep stopped with SIGTERM or Ctrl-C died
with its jobs still training (submitit tells a job to ignore SIGTERM, and a controller started by a
script in the background ignores SIGINT), and a sweep killed outright left them to train for minutes.
This launcher keeps submitit's processes, logs (``<sweep>/.submitit/``) and time limit, and:

- does not start the runs that already completed with the same run_key;
- ends every process it started, controllers and jobs, when the sweep gets SIGINT or SIGTERM, records
  their unfinished runs failed, and prints the command that resumes the sweep (as the ``parallel``
  launcher does, :mod:`crisp.sweep.pool`);
- makes each job's process watch the sweep's (:func:`crisp.sweep.watch.end_with`): a job whose sweep
  is gone, by ``kill -9`` too, ends itself, and its controller exits after it;
- prints one line per run as it ends, and records a run failed when its process ends without a result.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import OmegaConf, open_dict, read_write

from crisp.core import results
from crisp.core.claim import RunLock
from crisp.sweep import launch, watch
from crisp.sweep.jobs import Job, execute, job_return, record_failure
from crisp.sweep.log_tail import log_tail
from crisp.sweep.pool import SweepInterrupted, signals_raise

log = logging.getLogger("crisp")


@dataclass
class LocalTask:
    """What one submitit job runs: one of the sweep's jobs, in this process, for as long as the sweep lives."""

    job: Job
    hydra_context: HydraContext
    task_function: TaskFunction
    singleton_state: dict[Any, Any]
    sweep: watch.Process

    def __call__(self) -> JobReturn:
        import submitit

        watch.end_with(self.sweep)
        Singleton.set_state(self.singleton_state)
        setup_globals()
        with read_write(self.job.config.hydra), open_dict(self.job.config.hydra):
            self.job.config.hydra.job.id = submitit.JobEnvironment().job_id
        return execute(self.hydra_context, self.job, self.task_function)

    def checkpoint(self) -> Any:
        """At its time limit (``timeout_min``), submitit starts the job again (as Hydra's launcher has it)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def launch_jobs(launcher, jobs: list[Job]) -> list[JobReturn]:
    sweep_dir = launch.prepare(launcher)
    returns: dict[int, JobReturn] = {}
    todo = []
    for job in jobs:
        if results.is_completed(job.output_dir, job.record["run_key"]):
            log.info("%s: already completed in %s, skipped", job.record["output_dir"], job.output_dir)
            returns[job.idx] = job_return(job, {**job.record, "status": "skipped"})
        else:
            todo.append(job)
    if todo:
        returns.update(_run(launcher, sweep_dir, todo))
    return [returns[job.idx] for job in jobs]


def _executor(params: dict[str, Any]):
    """submitit's local executor, with the launcher's settings mapped as Hydra's submitit launcher maps them."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    executor = submitit.AutoExecutor(cluster="local", folder=params["submitit_folder"])
    common = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in common else f"local_{key}": value for key, value in params.items()
                                  if key != "submitit_folder"})
    return executor


def _run(launcher, sweep_dir: Path, jobs: list[Job]) -> dict[int, JobReturn]:
    returns: dict[int, JobReturn] = {}
    this = watch.Process.this()
    tasks = [LocalTask(job, launcher.hydra_context, launcher.task_function, Singleton.get_state(), this)
             for job in jobs]
    start = time.monotonic()
    try:
        with signals_raise():
            submitted = _executor(launcher.params).submit_array(tasks)
            for job, sub in zip(jobs, submitted, strict=True):
                log.info("started %s (submitit job %s, log %s)", job.record["output_dir"], sub.job_id, sub.paths.stdout)
            running = list(zip(jobs, submitted, strict=True))
            while running:
                time.sleep(0.5)
                for job, sub in [(j, s) for j, s in running if s.done()]:
                    running.remove((job, sub))
                    returns[job.idx] = _outcome(job, sub)
                    launch.log_outcome(job, returns[job.idx].return_value, time.monotonic() - start)
    except SweepInterrupted as stop:
        killed = watch.kill_tree(this.pid, include_self=False)  # controllers and jobs: all of the sweep's processes
        for job in jobs:
            _release(job, killed)
            if job.idx not in returns:
                why = f"the sweep was interrupted ({stop}) before this run finished"
                value = record_failure(job, "Interrupted", why)
                launch.log_outcome(job, value, time.monotonic() - start)
        log.error("crisp: sweep interrupted by %s: its runs' processes are stopped and their runs recorded failed; "
                  "run the same command with hydra.sweep.dir=%s to finish it", stop, sweep_dir)
        raise SystemExit(143 if str(stop) == "SIGTERM" else 130) from None
    return returns


def _release(job: Job, killed: list[int]) -> None:
    """Remove the run's claim if a process that was just killed held it: dead, it may not be reaped yet (its
    parent, a controller, was killed too), and a claim of a process not yet reaped would look alive."""
    claim = RunLock(job.output_dir)
    holder = claim.holder()
    if holder is not None and holder.host == socket.gethostname() and holder.pid in killed:
        claim.path.unlink(missing_ok=True)


def _outcome(job: Job, sub) -> JobReturn:
    """What the job's process returned, or a failed record that says how it ended without a result."""
    from submitit.core.utils import pickle_load

    log_path = sub.paths.stdout
    try:
        outcome, value = pickle_load(sub.paths.result_pickle)
    except Exception:  # no result file (the process was killed or died) or a half-written one
        code = sub._process.poll() if sub._process is not None else None
        error = f"its process ended (controller exit code {code}) without a result; log: {log_path}"
        return job_return(job, record_failure(job, "WorkerDied", error, log_tail(log_path)))
    if outcome != "success":  # ("error", traceback): raised outside the run's own error handling
        last = [line for line in str(value).splitlines() if line.strip() and not line[0].isspace()]
        return job_return(job, record_failure(job, "WorkerError", f"{last[-1] if last else 'an error'}; log: "
                                                                  f"{log_path}", str(value)))
    if value.status != JobStatus.COMPLETED:  # the task function raised (crisp.run records and returns)
        err = value._return_value
        return job_return(job, record_failure(job, type(err).__name__, f"{err}; log: {log_path}"))
    return value

