"""``hydra/launcher=slurm_lockstep``: a sweep's lockstep groups as one SLURM job array, one group per task.

The runs are grouped exactly as ``hydra/launcher=lockstep`` groups them on one machine
(:func:`crisp.sweep.lockstep_launcher.group_jobs`: by recipe, at most ``max_runs_per_group`` runs, a run shared
by several jobs once, completed runs not at all), and each group is an array task that trains it as
one fused model (:func:`crisp.sweep.group_task.run_group`) on the task's node. Submitting, following,
and what is recorded when a task ends without its results are :mod:`crisp.sweep.slurm`'s; a group
is split only by ``max_runs_per_group``, not to fill GPUs: each task gets devices of its own.

Requeue, preemption and time limits work as for one run per task (:class:`ArrayTask`): a requeued
group trains again what had not completed (completed runs are skipped by run_key), and at the last
time limit the runs it had not finished are recorded failed (``SlurmTimeLimit``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hydra.core.utils import JobReturn, configure_log

from crisp.lockstep.options import GroupOptions
from crisp.sweep import lockstep_launcher, slurm
from crisp.sweep.group_task import run_group
from crisp.sweep.jobs import Job, job_return, record_failure
from crisp.sweep.pool import visible_gpus
from crisp.sweep.slurm_task import ArrayTask, SlurmTimeLimit

log = logging.getLogger("crisp")


@dataclass
class LockstepTask(ArrayTask):
    """An array task that trains its jobs as one lockstep group, in the task's process."""

    options: GroupOptions  # row_width, pack_workers, from the launcher's settings (crisp.sweep.options)

    def run(self, jobs: list[Job]) -> list[JobReturn]:
        # the sweep's console logging, into the task's log: a group has no job logging of its own
        configure_log(jobs[0].config.hydra.hydra_logging, jobs[0].config.hydra.verbose)
        if self._out_of_time is None:
            try:  # the runs' own failures, a time limit in training included, are recorded by run_group
                returns = run_group(self.hydra_context, jobs, self.options)
                return [self.charged_to_time_limit(job, ret) for job, ret in zip(jobs, returns, strict=True)]
            except Exception:  # raised while the group was being set up, outside the runs' error handling
                if self._out_of_time is None:
                    raise
        return [job_return(job, record_failure(job, SlurmTimeLimit.__name__, self._out_of_time)) for job in jobs]


def launch_jobs(launcher, jobs: list[Job]) -> list[JobReturn]:
    sweep_dir = slurm.prepare(launcher)
    lockstep_launcher.check_lockstep(jobs)
    options = launcher.options  # crisp.sweep.options.SlurmLockstepOptions
    auto = options.max_runs_per_group == "auto"
    returns, groups = lockstep_launcher.group_jobs(jobs, options.max_runs_per_group, devices=1,
                                                   memory=task_memory(launcher.params) if auto else None)
    lockstep_launcher.refuse_unfused(groups)  # before anything is submitted
    returns.update(slurm.run_array(launcher, sweep_dir, [LockstepTask.of(launcher, group, options=options.group)
                                                         for group in groups]))
    return [returns[job.idx] for job in jobs]


def task_memory(params: dict[str, Any]) -> int | None:
    """Bytes one array task trains a group in, for ``max_runs_per_group=auto``; None: this machine's device.

    A task without GPUs trains in the memory it asks for (``mem_gb``). The nodes' GPUs cannot be seen
    from a login node: groups are sized for this machine's GPU if it has one like them, and without
    one, that is said, since this machine's memory is then a poor guess.
    """
    gpus = params.get("gpus_per_task") or params.get("gpus_per_node")
    if not gpus:
        return int(params["mem_gb"] * 2**30) if params.get("mem_gb") else None
    if not visible_gpus():
        log.warning("lockstep: max_runs_per_group=auto cannot see the nodes' GPUs from this machine, which has "
                    "none: groups are sized for its memory; set hydra.launcher.max_runs_per_group to fit a GPU")
    return None
