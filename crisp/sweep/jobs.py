"""A sweep's jobs as a launcher sees them, and what a launcher writes when a job's process cannot.

Launchers that run jobs in other processes (crisp's ``parallel`` and ``lockstep``, ``slurm``)
load each job's config here, in the sweep's process, to know its run directory and results record
before it starts. When a worker dies, stalls, is cancelled or is interrupted, the job itself can no
longer write its results.json: :func:`record_failure` writes it for the job, saying what happened,
so the report lists it and a re-run of the same command trains it again.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, run_job
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from crisp.core import results
from crisp.core.claim import RunLock
from crisp.core.config import resolved_config, written_config

log = logging.getLogger("crisp")


@dataclass
class Job:
    idx: int
    overrides: list[str]
    config: DictConfig  # the job's own sweep config, Hydra's section included
    output_dir: Path
    record: dict[str, Any]  # the fields every results.json of this run starts with
    sweep_dir: Path

    @property
    def name(self) -> str:
        return self.record["name"]


def job_config(hydra_context: HydraContext, config: DictConfig, overrides: Sequence[str], idx: int) -> DictConfig:
    """The job's config as Hydra's own launchers build it (job id and number set)."""
    job_cfg = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(job_cfg):
        job_cfg.hydra.job.id = f"{job_cfg.hydra.job.name}_{idx}"
        job_cfg.hydra.job.num = idx
    return job_cfg


JOBS_PER_PROCESS = 4
# what forked processes call (set just before they fork; fork copies it, nothing of it is pickled)
_FORKED: Callable[[Any], Any] | None = None


def _call_forked(item: Any) -> Any:
    return _FORKED(item)


def map_forked(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(item) for item in items]``, on Linux in processes forked from this one (one per
    ``JOBS_PER_PROCESS`` items and core) when there are enough items: Hydra's per-job work is pure
    Python and adds up over thousands of jobs.
    ``fn`` reaches the processes by the fork; items and results are pickled."""
    global _FORKED
    processes = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1,
                    len(items) // JOBS_PER_PROCESS)
    if processes < 2 or not sys.platform.startswith("linux"):
        return [fn(item) for item in items]
    _FORKED = fn
    try:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_call_forked, items, chunksize=JOBS_PER_PROCESS))
    finally:
        _FORKED = None


def job_configs(hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]],
                initial_job_idx: int) -> list[DictConfig]:
    """Every job's config; Hydra composes each from scratch, which adds up: a big sweep's in forked processes."""
    jobs = [(list(overrides), initial_job_idx + offset) for offset, overrides in enumerate(job_overrides)]
    return map_forked(lambda job: job_config(hydra_context, config, *job), jobs)


def load_jobs(hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]],
              initial_job_idx: int) -> list[Job]:
    jobs = []
    configs = job_configs(hydra_context, config, job_overrides, initial_job_idx)
    for offset, (overrides, job_cfg) in enumerate(zip(job_overrides, configs, strict=True)):
        idx = initial_job_idx + offset
        HydraConfig.instance().set_config(job_cfg)  # ${hydra:...} resolvers read it
        sweep_dir = Path(str(job_cfg.hydra.sweep.dir))
        output_dir = sweep_dir / str(job_cfg.hydra.sweep.subdir)
        record = results.run_record(resolved_config(job_cfg), output_dir, task_overrides(overrides), base=sweep_dir,
                                    unresolved=written_config(job_cfg))
        jobs.append(Job(idx, list(overrides), job_cfg, output_dir, record, sweep_dir))
    return jobs


def primary_metric(config: dict[str, Any]) -> str | None:
    """The results key of the metric the report compares for this config's task (``val_pearson`` for STS-B),
    recorded from a run's start: a table of runs that all failed is still headed by its task's metric."""
    from crisp.training.tasks import TASKS

    task = TASKS.get((config.get("data") or {}).get("hub_config"))
    return task.primary if task is not None else None


def task_overrides(overrides: Sequence[str]) -> list[str]:
    """A job's overrides as its run records them: Hydra's own settings left out (as Hydra's overrides.task)."""
    return [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]


def execute(hydra_context: HydraContext, job: Job, task_function: TaskFunction) -> JobReturn:
    """Run one job in this process, as Hydra's launchers do (output dir, .hydra/, job logging)."""
    HydraConfig.instance().set_config(job.config)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=job.config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def job_return(job: Job, value: dict[str, Any]) -> JobReturn:
    """A JobReturn made by the launcher for a job whose worker returned none."""
    return JobReturn(overrides=job.overrides, cfg=job.config, hydra_cfg=job.config, working_dir=os.getcwd(),
                     task_name=job.config.hydra.job.name, status=JobStatus.COMPLETED, _return_value=value)


def record_failure(job: Job, kind: str, message: str, details: str = "") -> dict[str, Any]:
    """Record ``job`` failed (unless it completed after all) and free its run directory."""
    RunLock.clear_stale(job.output_dir)
    if results.is_completed(job.output_dir, job.record["run_key"]):
        return results.read(job.output_dir)
    return results.record_failure(job.output_dir, job.record, {"type": kind, "message": message, "traceback": details})
