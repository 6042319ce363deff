"""Lockstep groups over several GPUs: split and ordered by what each costs to train, not by its count.

A group's cost is runs x parameters x epochs x training text. The training text is the bytes of the
local training file (a GLUE folder's ``train.tsv``, or ``data.train_file``) where every group reads one
(bytes follow tokens from task to task: a pair task's rows are longer), cut to ``data.train_limit``;
else the training rows where every group knows them
(``data.train_limit``, generated data's ``data.num_train``); else the same for every group. One
sweep's groups are measured in one unit.

The pool (:class:`crisp.sweep.pool.WorkerPool`) runs one task per GPU and starts the next as a GPU frees
up. Handed the groups costliest first, that is greedy list scheduling, longest first: its finish time is
within 4/3 of the best placement's, where handing them out by count can leave one GPU with the one big
task's whole length after the others are done. :func:`placement` is what the pool then does, given the
costs, for the sweep's log and the tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

from crisp.core.data_config import source_of
from crisp.sweep.jobs import Job


@cache
def _lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _generated(job: Job) -> bool:
    return source_of(job.config.data) == "synthetic"  # as crisp.training.data.load tells them apart


def _text_bytes(job: Job) -> float | None:
    file = None if _generated(job) else OmegaConf.select(job.config, "data.train_file", default=None)
    folder = None if _generated(job) else OmegaConf.select(job.config, "data.dir", default=None)
    train = Path(str(file)).expanduser() if file else Path(str(folder)) / "train.tsv" if folder else None
    if train is None or not train.is_file():
        return None
    size, limit = train.stat().st_size, OmegaConf.select(job.config, "data.train_limit", default=None)
    return size * min(1.0, limit / max(_lines(str(train)), 1)) if limit else float(size)


def _text_rows(job: Job) -> float | None:
    limit = OmegaConf.select(job.config, "data.train_limit", default=None)
    rows = [r for r in (limit, job.config.data.get("num_train") if _generated(job) else None) if r]
    return float(min(rows)) if rows else None


def text_sizes(jobs: Sequence[Job]) -> list[float]:
    """Each job's training text, in one unit for all: bytes, else rows, else 1 (see the module)."""
    for measure in (_text_bytes, _text_rows):
        sizes = [measure(job) for job in jobs]
        if all(size is not None for size in sizes):
            return sizes
    return [1.0] * len(jobs)


def cost_of(jobs: Sequence[Job], parameters: Callable[[Job], int]) -> Callable[[Sequence[Job]], float]:
    """A function that gives a group of these jobs its cost; ``parameters`` counts a job's model's
    (called once per model config)."""
    counted: dict[str, float] = {}

    def params(job: Job) -> float:
        key = json.dumps(OmegaConf.to_container(job.config.model, resolve=False), sort_keys=True, default=str)
        if key not in counted:
            try:
                counted[key] = float(parameters(job))
            except Exception:  # the worker meets the same problem and reports it
                counted[key] = 1.0
        return counted[key]

    # one run's cost, for each job: a group's runs share their recipe, so its first job stands for all
    per_run = {id(job): params(job) * float(job.config.trainer.max_epochs) * text
               for job, text in zip(jobs, text_sizes(jobs), strict=True)}
    return lambda group: len(group) * per_run[id(group[0])]


def placement(costs: Sequence[float], devices: int) -> list[list[int]]:
    """Which tasks each GPU trains when the tasks are handed out costliest first, each to the GPU that
    frees up first (the one with the least cost so far): task indices per GPU."""
    loads, where = [0.0] * devices, [[] for _ in range(devices)]
    for task in sorted(range(len(costs)), key=lambda k: -costs[k]):
        gpu = min(range(devices), key=lambda d: loads[d])
        where[gpu].append(task)
        loads[gpu] += costs[task]
    return where
