"""What a worker process (or a SLURM array task) runs for one lockstep group of a sweep's jobs.

Each job's run directory and ``.hydra/`` are made as Hydra makes them for a job (its ``run_job``, in
forked processes for a big group: pure Python that adds up), each job's values are checked again
(an array task may run long after its sweep checked them), and the group trains through
:func:`crisp.lockstep.group.train_group`: the one run lifecycle, for all of them at once.
"""

from __future__ import annotations

from dataclasses import replace

from hydra.core.utils import JobReturn, run_job
from hydra.types import HydraContext

from crisp.core import lifecycle
from crisp.core.config import validate
from crisp.core.errors import ConfigError
from crisp.lockstep.group import train_group
from crisp.lockstep.options import GroupOptions
from crisp.sweep.jobs import Job, job_return, map_forked


def _job_setup(hydra_context: HydraContext, job: Job):
    # no job logging: the group's output is its worker's log
    return run_job(hydra_context=hydra_context, task_function=lambda cfg: cfg, config=job.config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
                   configure_logging=False).return_value


def run_group(hydra_context: HydraContext, jobs: list[Job], options: GroupOptions) -> list[JobReturn]:
    configs = map_forked(lambda job: _job_setup(hydra_context, job), jobs)
    runs = []
    for job, cfg in zip(jobs, configs, strict=True):
        run = lifecycle.Run.of(job.record, job.output_dir)
        try:
            validate(cfg)
        except ConfigError as err:
            run.fail(err)
        runs.append((run, cfg))
    options = replace(options, sweep_id=jobs[0].sweep_dir.name)  # the W&B runs' sweep
    return [job_return(job, outcome) for job, outcome in zip(jobs, train_group(runs, options), strict=True)]
