"""What one SLURM array task runs: a list of a sweep's jobs, in the task's process.

submitit pickles an :class:`ArrayTask` for each task of the sweep's job array (``crisp.sweep.slurm``)
and calls it on the node. It runs its jobs the way Hydra's launchers run a job
(:func:`crisp.sweep.jobs.execute`), one after another, and returns their JobReturns; the sweep reads
them back from submitit's result file.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import open_dict, read_write

from crisp.core import heartbeat, results
from crisp.core.lifecycle import failure
from crisp.sweep.jobs import Job, execute, job_return, record_failure


def progress_file(sweep_dir: Path, task_id: str) -> Path:
    """The heartbeat file an array task's training reports its progress into (on the cluster's shared disk)."""
    return Path(sweep_dir) / ".crisp" / "slurm" / task_id / "heartbeat"


class SlurmTimeLimit(RuntimeError):
    """A task reached its time limit with no requeue left (``max_num_timeout`` used up)."""


@dataclass
class ArrayTask:
    """What one array task runs, pickled by submitit: ``jobs`` one after another, in this process.

    Checkpointable: at SIGUSR2 before the time limit, submitit calls :meth:`checkpoint` and requeues
    the task (at most ``max_num_timeout`` times); the requeued task runs its jobs again, and the run
    that was cut short starts over. A task with no requeue left records its unfinished runs failed
    with :class:`SlurmTimeLimit`. Another way to run a list of jobs (a lockstep group trained in one
    process) overrides :meth:`run`.
    """

    jobs: list[Job]
    hydra_context: HydraContext
    task_function: TaskFunction
    singleton_state: dict[Any, Any]
    timeout_min: int
    max_num_timeout: int

    @classmethod
    def of(cls, launcher, jobs: list[Job], **fields: Any) -> ArrayTask:
        """The task that runs ``jobs`` with the launcher's Hydra context, task function and time limits."""
        params = launcher.params
        return cls(jobs, launcher.hydra_context, launcher.task_function, Singleton.get_state(), params["timeout_min"],
                   params["max_num_timeout"], **fields)

    def __call__(self) -> list[JobReturn]:
        import submitit

        Singleton.set_state(self.singleton_state)
        setup_globals()
        task_id = submitit.JobEnvironment().job_id
        # where training says how far it is, for the sweep that follows the array (crisp.sweep.progress)
        beat = progress_file(self.jobs[0].sweep_dir, task_id)
        beat.parent.mkdir(parents=True, exist_ok=True)
        os.environ[heartbeat.ENV] = str(beat)
        for job in self.jobs:
            with read_write(job.config.hydra), open_dict(job.config.hydra):  # read-only once HydraConfig saw it
                job.config.hydra.job.id = task_id
        self._out_of_time: str | None = None  # why, once the time limit came with no requeue left
        self._name_the_last_timeout(task_id)
        return self.run(self.jobs)

    def run(self, jobs: list[Job]) -> list[JobReturn]:
        """Each job in turn; after the last time limit, the jobs not yet run are recorded failed, not started."""
        returns = []
        for job in jobs:
            if self._out_of_time is None:
                try:
                    returns.append(self.charged_to_time_limit(job, execute(self.hydra_context, job,
                                                                           self.task_function)))
                    continue
                except Exception:  # raised outside the run's own error handling (crisp.run records it inside)
                    if self._out_of_time is None:
                        raise
            returns.append(job_return(job, record_failure(job, SlurmTimeLimit.__name__, self._out_of_time)))
        return returns

    def charged_to_time_limit(self, job: Job, ret: JobReturn) -> JobReturn:
        """``ret``, or, for a run the last time limit stopped, its failure recorded as :class:`SlurmTimeLimit`.

        The limit stops training by raising from a signal handler, wherever the process then is. Most code
        lets that exception through, but not all: one landing in an import leaves a module half made (its
        next use fails with an error of its own), and code that catches errors may raise another in their
        place. Whatever such a run ended with, the time limit ended it; that error is kept in its traceback.
        """
        if self._out_of_time is None:
            return ret
        ended = (ret.return_value if ret.status == JobStatus.COMPLETED
                 else {"status": results.FAILED, "error": failure(ret._return_value)})
        error = ended.get("error") or {}
        if ended.get("status") != results.FAILED or error.get("type") == SlurmTimeLimit.__name__:
            return ret
        details = f"the run ended with {error.get('type')}: {error.get('message')}\n{error.get('traceback', '')}"
        return job_return(job, record_failure(job, SlurmTimeLimit.__name__, self._out_of_time, details))

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)

    def _name_the_last_timeout(self, task_id: str) -> None:
        """Turn submitit's bare "timed-out too many times" into an error that says which task and limit."""
        from submitit.core.job_environment import JobEnvironment
        from submitit.core.utils import UncompletedJobError

        signum = JobEnvironment._usr_sig()
        submitit_handler = signal.getsignal(signum)
        if not callable(submitit_handler):
            return
        message = (f"SLURM task {task_id} reached its time limit (timeout_min={self.timeout_min}) and has no "
                   f"requeue left (max_num_timeout={self.max_num_timeout}): the run did not finish")

        def handler(sig, frame):
            try:
                submitit_handler(sig, frame)
            except UncompletedJobError as err:
                self._out_of_time = f"{message} ({err})"
                stop = SlurmTimeLimit(self._out_of_time)
                heartbeat.stop_with(stop)  # in case this raise lands inside a logging call, which would swallow it
                raise stop from None

        signal.signal(signum, handler)
