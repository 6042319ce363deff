"""``hydra/sweeper=crisp``: a grid's jobs composed once and checked, all of them, before any runs.

Hydra's basic sweeper expands the grid; this one then, before it writes anything:

- names each job's run directory from what varies: the keys of the grid whose values differ between
  jobs, other than strategy, sparsity and seed (the run's name has those), as folders before the name:
  ``-m optim.lr=1e-5,5e-5 seed=1`` gives ``optim.lr=1e-5/dense_seed1`` and ``optim.lr=5e-5/dense_seed1``
  (unless the command sets ``hydra.sweep.subdir`` itself; a ``name=`` given to every job labels the runs
  and leaves each its own folder);
- composes every job and checks its values (:func:`crisp.core.config.validate`): one bad value of one
  job stops the whole grid, naming the job, before any run trains;
- checks the directories: each lies inside the sweep's directory, jobs share one only when they
  are the same run (equal run_keys: a dense job of each strategy is one run, trained once), and this
  process can write the sweep's directory and every run's (:mod:`crisp.sweep.folders`).

crisp's launchers then take the composed jobs (``launch_jobs``); Hydra's own launchers get the
overrides, with the directory names, and compose them again as they always do.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from crisp.core.config import validate
from crisp.core.errors import ConfigError
from crisp.sweep.folders import check_writable
from crisp.sweep.jobs import Job, load_jobs, primary_metric, task_overrides

log = logging.getLogger("crisp")
IN_THE_NAME = ("strategy", "sparsity", "seed", "name", "sparsifier")
RUN_NAME = "${crisp.run_name:${strategy.name},${sparsity},${seed},${sparsifier}}"  # what ${name} is by default


def _in_the_name(key: str) -> bool:
    """Whether a run's name tells the values of ``key`` apart (a sparsifier's own keys: ``entmax_alpha2_seed1``)."""
    from crisp.sparsity import registry

    own = {f"sparsifier.{k}" for entry in registry.SPARSIFIERS.values() for k in entry.keys}
    return key in IN_THE_NAME or key in own
# what says how a run is launched or watched, not what it computes: never a folder of its own
NOT_A_FOLDER = ("hydra", "logger", "report", "sweep", "tags")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _folder(override: str) -> str:
    key, _, value = override.partition("=")
    value = re.sub(r"[^A-Za-z0-9._,+=-]+", "_", value.strip("'\"").strip("/"))
    return f"{key.lstrip('+~')}={value}"


def with_run_dirs(jobs: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each job's overrides with its run directory (see the module), unless the grid names directories itself."""
    if any(_key(o) == "hydra.sweep.subdir" for job in jobs for o in job):
        return [list(job) for job in jobs]
    def of(job: Sequence[str], key: str) -> tuple[str, ...]:  # ~key then +key=... set one key twice
        return tuple(o for o in job if _key(o) == key)

    keys = list(dict.fromkeys(_key(o) for job in jobs for o in job))
    varying = [key for key in keys if len({of(job, key) for job in jobs}) > 1 and not _in_the_name(key)
               and key.split(".")[0].split("/")[0] not in NOT_A_FOLDER]
    # a name the command gives every job is the runs' label, not their folder: each run keeps its own
    leaf = RUN_NAME if "name" in keys else "${name}"
    out = []
    for job in jobs:
        folders = [_folder(o) for key in varying for o in of(job, key)]
        subdir = "/".join([*folders, leaf])
        out.append([*job, f"hydra.sweep.subdir='{subdir}'"] if folders or leaf != "${name}" else list(job))
    return out


def _shown(job: Job) -> str:
    return " ".join(task_overrides(job.overrides))


def check(jobs: Sequence[Job]) -> None:
    """Every job's values, and every run's directory (see the module); ConfigError names the job."""
    owner: dict[Path, Job] = {}
    if jobs:
        check_writable(jobs[0].sweep_dir, f"hydra.sweep.dir={jobs[0].sweep_dir}")
    for job in jobs:
        root = job.sweep_dir.resolve()
        try:
            validate(job.config)
        except ConfigError as err:
            raise ConfigError(f"job {job.idx} of the grid ({_shown(job)}): {err}") from None
        where = job.output_dir.resolve()
        if not where.is_relative_to(root) or where == root:
            subdir = OmegaConf.select(job.config, "hydra.sweep.subdir")
            raise ConfigError(f"hydra.sweep.subdir={subdir!r} is not allowed: it puts job {job.idx}'s run at {where}, "
                              f"outside the sweep's directory {root}")
        if where not in owner:
            check_writable(where, f"the run folder {where} (job {job.idx}: {_shown(job)})")
        first = owner.setdefault(where, job)
        if first.record["run_key"] != job.record["run_key"]:
            raise ConfigError(
                f"jobs {first.idx} ({_shown(first)}) and {job.idx} ({_shown(job)}) are different "
                f"runs but would share the directory {where}: give hydra.sweep.subdir the keys that tell them apart "
                "(or leave it unset: crisp names directories from what varies)")


def compose_and_check(sweeper, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Job]:
    jobs = load_jobs(sweeper.hydra_context, sweeper.config, job_overrides, initial_job_idx)
    check(jobs)
    for job in jobs:  # after the checks: the tasks' module imports torch
        if (metric := primary_metric(job.record["config"])) is not None:
            job.record["metric"] = metric
    return jobs


def expand(sweeper, arguments: list[str]) -> list[list[list[str]]]:
    """The grid's batches of jobs (Hydra's basic sweeper's expansion), each job with its run directory.

    ``hydra.sweeper.grids`` (crisp's sweeper) makes the sweep a union of grids: each grid's keys with
    ``hydra.sweeper.params`` and the command's overrides, expanded one by one and joined, a job that two
    grids share once. A study whose configurations are no product of keys is such a union
    (``experiment=controls``: top-k and random keys over sparsity, entmax, which takes none, and dropout).
    The command refines the grids: an override of a key that grids set replaces it in those grids and
    leaves the others alone (``sparsity=0,0.8`` narrows top-k's and random's sparsities, not entmax's);
    any other override (``seed=1,2``, ``data=rte``) applies to every grid."""
    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    grids = getattr(sweeper, "grids", None) or [{}]
    owned = {key for grid in grids for key in grid}
    jobs: dict[tuple[str, ...], None] = {}
    for grid in grids:
        mine = [a for a in arguments if _key(a) not in owned or _key(a) in grid]
        params = [f"{k}={v}" for k, v in {**sweeper.params, **grid}.items()] + mine
        for job in sweeper.split_arguments(parser.parse_overrides(params), None)[0]:
            jobs.setdefault(tuple(job), None)
    named = with_run_dirs([list(job) for job in jobs])
    size = sweeper.max_batch_size or len(named) or 1
    return [named[i : i + size] for i in range(0, len(named), size)] or [[]]
