"""``hydra/launcher=slurm``: a sweep as one SLURM job array, followed task by task to the report.

Hydra's stock submitit launcher waits on ``job.results()``, which raises for the first array task
that was cancelled, timed out or lost its node: the sweep dies with a traceback and no report. It
also polls ``sacct``, which on a cluster without accounting prints a warning at every poll and never
learns that a task ended. This launcher keeps what submitit does well (one ``sbatch`` job array,
``array_parallelism``, SIGUSR2 before the time limit, checkpoint and requeue up to
``max_num_timeout``) and replaces how a sweep follows its tasks:

- runs already completed with the same run_key are not submitted again, so running the same command
  again submits only what is missing;
- each array task runs an :class:`~crisp.sweep.slurm_task.ArrayTask`: a list of jobs, in one process
  (one job per task here; ``hydra/launcher=slurm_lockstep`` makes each task a lockstep group:
  :mod:`~crisp.sweep.slurm_lockstep`);
- the sweep follows the array with ``squeue`` (:mod:`~crisp.sweep.slurm_queue`: it works with
  accounting off, and ``sacct`` is asked only about tasks that slurmctld has forgotten) and logs when
  a task starts, is requeued and ends;
- a task that ends CANCELLED, TIMEOUT, NODE_FAIL, FAILED, OUT_OF_MEMORY, ... without completing its
  runs gets a failed results.json (:func:`crisp.sweep.jobs.record_failure`) that names the SLURM task
  and why; the sweep goes on to the report, which then exits non-zero
  (:class:`crisp.sweep.callback.SweepCallback`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from crisp.core import results
from crisp.sweep import launch, progress
from crisp.sweep.jobs import Job, job_return, record_failure
from crisp.sweep.log_tail import log_tail
from crisp.sweep.pool import SweepInterrupted, signals_raise
from crisp.sweep.slurm_queue import ACTIVE, HELD, Queue, describe_exit, free_dead_claims, release_claim
from crisp.sweep.slurm_task import ArrayTask, progress_file

log = logging.getLogger("crisp")

# why a task in a final state left its runs unfinished: (error type in results.json, what happened)
ENDINGS = {
    "CANCELLED": ("SlurmCancelled", "was cancelled (scancel, or an administrator) before its run finished"),
    "TIMEOUT": ("SlurmTimeLimit", "was killed at its time limit (timeout_min={timeout_min})"),
    "NODE_FAIL": ("SlurmNodeFail", "was lost with its node {node}"),
    "FAILED": ("SlurmFailed", "failed: its process {exit} before it returned"),
    "OUT_OF_MEMORY": ("SlurmOutOfMemory", "ran out of memory (mem_gb={mem_gb})"),
    "PREEMPTED": ("SlurmPreempted", "was preempted and not requeued"),
    "BOOT_FAIL": ("SlurmBootFail", "could not start: its node failed to boot"),
    "DEADLINE": ("SlurmDeadline", "reached its deadline before it finished"),
    "COMPLETED": ("SlurmNoResult", "ended without returning its runs' results"),
    "UNKNOWN": ("SlurmTaskLost", "is no longer in SLURM's queue and left no result (how it ended is unknown: "
                                 "SLURM keeps no record of it)"),
}


# --- submitting -------------------------------------------------------------------------------


@dataclass
class Tracked:
    """One submitted array task, as the sweep follows it."""

    task: ArrayTask
    slurm: Any  # submitit.SlurmJob
    state: str = "PENDING"
    restarts: int = 0
    node: str = ""
    started: float = field(default_factory=time.monotonic)  # submitted, then last seen starting
    no_result_since: float | None = None

    @property
    def id(self) -> str:
        return self.slurm.job_id

    @property
    def names(self) -> str:
        return ", ".join(job.name for job in self.task.jobs)


def launch_jobs(launcher, jobs: list[Job]) -> list[JobReturn]:
    sweep_dir = prepare(launcher)
    returns: dict[int, JobReturn] = {}
    todo = []
    for job in jobs:
        if results.is_completed(job.output_dir, job.record["run_key"]):
            log.info("%s: already completed in %s, skipped", job.name, job.output_dir)
            returns[job.idx] = job_return(job, {**job.record, "status": "skipped"})
        else:
            todo.append(job)
    returns.update(run_array(launcher, sweep_dir, [ArrayTask.of(launcher, [job]) for job in todo]))
    return [returns[job.idx] for job in jobs]


def prepare(launcher) -> Path:
    """The sweep's directory, once SLURM's commands are known to be here."""
    missing = [cmd for cmd in ("sbatch", "squeue", "srun") if shutil.which(cmd) is None]
    if missing:
        name = launcher.config.hydra.runtime.choices.get("hydra/launcher", "slurm")
        raise SystemExit(f"crisp: hydra/launcher={name} submits to SLURM, but {', '.join(missing)} is not on PATH "
                         "here: run the sweep on the cluster's login node, or use hydra/launcher=parallel")
    return launch.prepare(launcher)


def run_array(launcher, sweep_dir: Path, tasks: list[ArrayTask]) -> dict[int, JobReturn]:
    """Submit ``tasks`` as one job array and follow it to its end: a JobReturn for each of their jobs, by number."""
    if not tasks:
        return {}
    free_dead_claims([job for task in tasks for job in task.jobs])
    return _follow(_submit(launcher, tasks), launcher, sweep_dir)


def _executor(params: dict[str, Any]):
    """submitit's SLURM executor, with the launcher's parameters mapped as Hydra's submitit launcher maps them."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                     slurm_max_num_timeout=params["max_num_timeout"])
    common = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in common else f"slurm_{key}": value for key, value in params.items()
                                  if key not in ("submitit_folder", "max_num_timeout")})
    return executor


def _submit(launcher, tasks: list[ArrayTask]) -> list[Tracked]:
    from submitit.core.utils import FailedJobError

    params = launcher.params
    try:
        submitted = _executor(params).submit_array(tasks)
    except FailedJobError as err:  # sbatch refused: nothing runs, say what SLURM said
        said = str(err).strip().splitlines()
        raise SystemExit(f"crisp: sbatch refused the sweep's job array: {said[-1] if said else err} "
                         f"(hydra.launcher: partition={params.get('partition')}, timeout_min={params['timeout_min']}, "
                         f"cpus_per_task={params.get('cpus_per_task')}, gpus_per_task={params.get('gpus_per_task')}, "
                         f"mem_gb={params.get('mem_gb')})") from None
    tracked = [Tracked(task, job) for task, job in zip(tasks, submitted, strict=True)]
    array = tracked[0].id.split("_")[0]
    log.info("SLURM job %s: %d task(s), at most %d at once, partition %s, time limit %s min, "
             "requeued at most %d time(s) at the limit; task logs in %s", array, len(tracked),
             min(len(tracked), params["array_parallelism"]), params.get("partition") or "(default)",
             params["timeout_min"], params["max_num_timeout"], tracked[0].slurm.paths.stdout.parent.parent)
    for t in tracked:
        log.info("  task %s: %s", t.id, t.names)
    return tracked


# --- following --------------------------------------------------------------------------------


def _follow(tracked: list[Tracked], launcher, sweep_dir: Path) -> dict[int, JobReturn]:
    """Poll the array until every task has ended; one JobReturn per job, by job number."""
    returns: dict[int, JobReturn] = {}
    queue = Queue(tracked[0].id.split("_")[0])
    queue.accounting()  # found (and if off, said) once
    active = list(tracked)
    shown = progress.ProgressLines()
    try:
        with signals_raise():
            while active:
                shown.clear()
                seen = queue.poll()
                for t in list(active):
                    entry = seen.get(t.id)
                    if entry is None and queue.ok:
                        entry = queue.forgotten(t.id, t.restarts, t.node, t.slurm.paths.result_pickle)
                    if entry is None:
                        continue
                    state, restarts, node, exit_code = entry
                    if state in ACTIVE:
                        _note_progress(t, state, restarts, node)
                        continue
                    if _result_may_be_on_its_way(t, state):
                        continue
                    active.remove(t)
                    for job, ret in zip(t.task.jobs, _outcome(t, state, node, exit_code, launcher.params),
                                        strict=True):
                        returns[job.idx] = ret
                shown.show([SimpleNamespace(label=f"task {t.id} ({t.names})",
                                            files=progress_file(sweep_dir, t.id).parent)
                            for t in active if t.state == "RUNNING"])
                if active:
                    time.sleep(launcher.options.poll_s)
            shown.clear()
        _remove_progress_files(sweep_dir)
    except SweepInterrupted as stop:
        subprocess.run(["scancel", queue.array], capture_output=True, timeout=60)
        for t in active:
            for job in t.task.jobs:
                release_claim(job, t.id)
                record_failure(job, "Interrupted", f"the sweep was interrupted ({stop}): SLURM job {queue.array} "
                                                   f"was cancelled before task {t.id} finished")
        log.error("crisp: sweep interrupted by %s: its SLURM job %s is cancelled and its unfinished runs recorded "
                  "failed; run the same command with hydra.sweep.dir=%s to finish it", stop, queue.array, sweep_dir)
        raise SystemExit(143 if str(stop) == "SIGTERM" else 130) from None
    return returns


def _remove_progress_files(sweep_dir: Path) -> None:
    """The array's progress files go with the array (the folder too, when nothing else is in it)."""
    shutil.rmtree(sweep_dir / ".crisp" / "slurm", ignore_errors=True)
    with contextlib.suppress(OSError):
        (sweep_dir / ".crisp").rmdir()


def _note_progress(t: Tracked, state: str, restarts: int, node: str) -> None:
    if restarts > t.restarts:
        log.warning("task %s (%s) was requeued (restart %d): what it had not completed starts again when SLURM "
                    "reschedules it", t.id, t.names, restarts)
    elif state == "RUNNING" and t.state != "RUNNING":
        log.info("task %s (%s) running on %s", t.id, t.names, node or "?")
        t.started = time.monotonic()
    elif state in HELD and t.state != state:
        log.warning("task %s (%s) is held (%s): release it with `scontrol release %s`, or end it with `scancel %s`",
                    t.id, t.names, state, t.id, t.id)
    t.state, t.restarts, t.node = state, restarts, node or t.node


def _result_may_be_on_its_way(t: Tracked, state: str, grace_s: float = 30) -> bool:
    """A task SLURM says COMPLETED wrote its result before it exited; a shared file system may show it late."""
    if state != "COMPLETED" or t.slurm.paths.result_pickle.is_file():
        return False
    if t.no_result_since is None:
        t.no_result_since = time.monotonic()
    return time.monotonic() - t.no_result_since < grace_s


def _outcome(t: Tracked, state: str, node: str, exit_code: str, params: dict[str, Any]) -> list[JobReturn]:
    """The JobReturns of an ended task: what it returned, else a failure that says which task and why."""
    result = _read_result(t.slurm.paths.result_pickle)
    seconds = time.monotonic() - t.started
    if result is not None and result[0] == "success":
        returns = []
        for job, ret in zip(t.task.jobs, result[1], strict=True):
            if ret.status != JobStatus.COMPLETED:  # the task function raised (crisp.run records and returns)
                err = ret._return_value
                ret = job_return(job, record_failure(job, type(err).__name__, f"{err} (SLURM task {t.id})"))
            returns.append(ret)
            launch.log_outcome(job, ret.return_value, seconds, task=t.id)
        return returns
    log_path = t.slurm.paths.stdout
    if result is not None and "UncompletedJobError" in _exception_line(result[1]):
        # submitit's own "timed-out too many times", at the last limit before the task had started its runs
        kind, why, details = ("SlurmTimeLimit", f"reached its time limit (timeout_min={params['timeout_min']}) and has "
                              f"no requeue left (max_num_timeout={params['max_num_timeout']})", result[1])
    elif result is not None:  # ("error", traceback): the task raised outside the runs' own error handling
        kind, why, details = "SlurmTaskError", f"raised {_exception_line(result[1])}", result[1]
    else:
        kind, template = ENDINGS.get(state, ("SlurmTaskEnded", f"ended {state}"))
        why = template.format(timeout_min=params["timeout_min"], node=node or t.node or "?",
                              mem_gb=params.get("mem_gb"), exit=describe_exit(exit_code, params))
        details = log_tail(log_path, 40)
    message = f"SLURM task {t.id} {why} (state {state}); log: {log_path}"
    returns = []
    for job in t.task.jobs:
        release_claim(job, t.id)
        returns.append(job_return(job, record_failure(job, kind, message, details)))
    return returns


def _exception_line(trace: str) -> str:
    """``Type: message`` from a formatted traceback (its last line that is not indented)."""
    lines = [line for line in trace.splitlines() if line.strip() and not line[0].isspace()]
    return lines[-1] if lines else "an error"


def _read_result(path: Path) -> tuple[str, Any] | None:
    if not path.is_file():
        return None
    from submitit.core.utils import pickle_load

    try:
        return pickle_load(path)
    except Exception as err:  # a half-written or foreign file: treated as no result, but said
        log.warning("could not read %s: %s", path, err)
        return None

