"""``hydra/launcher=lockstep``: the runs of a sweep that can train together, trained as one model.

Jobs whose configs are equal except for what a grid varies per run (seed, sparsity, strategy and
its parameters, the learning rate, weight decay and warm-up, the dropout probabilities, and the names
that follow from them) share a recipe: the same model, data, batch size, epochs, optimizer and
trainer settings. Each group of them trains in one worker process as one
fused model (:mod:`crisp.lockstep`), one step for all its runs. Configs are compared before
interpolation, so ``data_seed: ${seed}`` is the same recipe for every seed.

A group larger than the device holds (about 20 bytes per parameter per run: weights, gradients,
AdamW's two moments and room for activations) is split into equal parts that take turns; on
several GPUs, the costliest groups are split until each GPU has one, and they run side by side,
handed out costliest first as GPUs free up (:mod:`crisp.sweep.placement`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

from hydra.core.utils import JobReturn
from omegaconf import OmegaConf

from crisp.core import results
from crisp.sweep import launch, placement
from crisp.sweep.jobs import Job, job_return
from crisp.sweep.pool import visible_gpus

log = logging.getLogger("crisp")
# a group's runs differ in these alone: each run keeps its own inside the fused model
VARIES_WITHIN_GROUP = ("hydra", "dropout", *results.VARIES_WITHIN_STUDY)
VARIES_WITHIN_GROUP_OPTIM = ("lr", "weight_decay", "warmup_ratio")  # of optim (crisp.lockstep.run_adamw)
BYTES_PER_PARAMETER = 20
ACTIVATIONS_PER_RUN = 150 * 2**20


def fusion_key(job: Job) -> str:
    """Jobs of one fusion key train as one fused model: their configs as written are equal but for what a
    group's runs vary (above, and the sparsifier's own keys, such as entmax's alpha)."""
    config = OmegaConf.to_container(job.config, resolve=False)
    kept = {k: v for k, v in config.items() if k not in VARIES_WITHIN_GROUP}
    kept["optim"] = {k: v for k, v in kept.get("optim", {}).items() if k not in VARIES_WITHIN_GROUP_OPTIM}
    if isinstance(kept.get("sparsifier"), dict):
        from crisp.sparsity import registry

        entry = registry.SPARSIFIERS.get(kept["sparsifier"].get("name", registry.DEFAULT))
        own = entry.keys if entry is not None else {}
        kept["sparsifier"] = {k: v for k, v in kept["sparsifier"].items() if k not in own}
    return json.dumps(kept, sort_keys=True, default=str)


def plan(jobs: Sequence[Job], capacity: int | None, devices: int,
         cost: Callable[[Sequence[Job]], float] = len) -> list[list[Job]]:
    """Groups of jobs with one recipe, each at most ``capacity`` runs, at least ``devices`` groups when
    possible (the costliest split in two, until each GPU has one); with several devices, costliest first."""
    by_recipe: dict[str, list[Job]] = {}
    for job in jobs:
        by_recipe.setdefault(fusion_key(job), []).append(job)
    groups = []
    for group in by_recipe.values():
        parts = math.ceil(len(group) / capacity) if capacity else 1
        groups += _split(group, parts)
    while len(groups) < devices and max(map(len, groups), default=0) > 1:
        costliest = max((g for g in groups if len(g) > 1), key=cost)
        groups.remove(costliest)
        groups += _split(costliest, 2)
    # the pool starts the next group as a GPU frees up: costliest first balances them (crisp.sweep.placement)
    return sorted(groups, key=cost, reverse=True) if devices > 1 else groups


def _split(group: list[Job], parts: int) -> list[list[Job]]:
    size = math.ceil(len(group) / parts)
    return [group[i : i + size] for i in range(0, len(group), size)]


def capacity(job: Job, max_runs: int | str | None, memory: int | None = None) -> int | None:
    """How many runs of ``job``'s recipe one device holds: ``max_runs``, or estimated for ``auto`` from
    ``memory`` bytes (by default this machine's smallest GPU, or its memory without one)."""
    if max_runs != "auto":
        return None if max_runs is None else int(max_runs)
    try:
        per_run = BYTES_PER_PARAMETER * _parameters(job) + ACTIVATIONS_PER_RUN
    except Exception as err:  # the worker will meet the same problem and report it
        log.warning("lockstep: cannot size groups for %s (%s): one group", job.name, err)
        return None
    return max(1, int(0.8 * (memory or _device_memory()) // per_run))


def _model_config(job: Job):
    from transformers import AutoConfig

    from crisp.training.hub import resolve_model

    model = OmegaConf.to_container(job.config.model, resolve=True)
    if model.get("from_config"):
        return AutoConfig.for_model(**model["from_config"], vocab_size=model.get("tokenizer_vocab_size", 30522))
    name, local = resolve_model(model["name_or_path"])
    return AutoConfig.from_pretrained(name, local_files_only=local)


def _parameters(job: Job) -> int:
    import torch
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForSequenceClassification.from_config(_model_config(job)).parameters())


def _device_memory() -> int:
    """Bytes of the smallest visible GPU (nvidia-smi: no CUDA context here), or of this machine's memory."""
    if visible_gpus() and shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False).stdout.split()
        if out:
            return min(int(v) for v in out) * 2**20
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def launch_jobs(launcher, jobs: list[Job], alone: str = "lockstep") -> list[JobReturn]:
    """Train the jobs' groups one per GPU at a time; with ``alone="process"`` (``hydra/launcher=auto``) a
    group of one run, or of runs that lockstep cannot train (one line says why), runs each in a worker process
    of its own. Forced (``hydra/launcher=lockstep``), a group lockstep cannot train stops the sweep before any
    run trains: exit 2 and why."""
    sweep_dir = launch.prepare(launcher)
    if alone == "lockstep":
        check_lockstep(jobs)
    gpus = visible_gpus()
    options = launcher.options  # crisp.sweep.options.LockstepOptions
    returns, groups = group_jobs(jobs, options.max_runs_per_group, len(gpus))
    # a group of one trains in a process of its own under auto: no need to ask
    whys = [why_not_in_lockstep(group[0]) if alone == "lockstep" or len(group) > 1 else None for group in groups]
    if alone == "lockstep":
        refuse_unfused(groups, whys)
    tasks = []
    for k, (group, why) in enumerate(zip(groups, whys, strict=True)):
        if why:
            log.info("%s: its %d runs train one process each", why, len(group))
        if alone == "process" and (len(group) == 1 or why):
            tasks += [launch.task(launcher, f"job{job.idx}-{job.name}", "jobs", [job], job.output_dir / "worker.log")
                      for job in group]
        else:
            log_path = sweep_dir / f"lockstep-group{k}-{launch.ATTEMPT}.log"
            tasks.append(launch.task(launcher, f"group{k}", "lockstep", group, log_path, options=options.group))
    if tasks:
        pending = [job for task in tasks for job in task.spec["jobs"]]
        ran = launch.run_tasks(sweep_dir, tasks, pending, max(1, len(gpus)), options.stall_timeout_s,
                               options.worker_start)
        returns.update({job.idx: ret for job, ret in zip(pending, ran, strict=True)})
    return [returns[job.idx] for job in jobs]


def lockstep_blocker(job: Job) -> str | None:
    """The trainer setting or callback of this job that a fused group cannot apply to each run, if any (the
    first, by name: ``trainer.max_time``, ``callbacks.checkpoint (ModelCheckpoint)``)."""
    from crisp.core.errors import ConfigError
    from crisp.training.trainer import lockstep_blockers

    try:
        blockers = lockstep_blockers(job.config)
    except ConfigError:  # a callback that cannot be imported: the run reports it
        return None
    return blockers[0] if blockers else None


def check_lockstep(jobs: Sequence[Job]) -> None:
    """``hydra/launcher=lockstep``: a job whose settings a fused group cannot apply per run stops the sweep before
    anything trains (exit 2), naming the setting; the default launcher trains such jobs one process each."""
    import sys

    for job in jobs:
        blocked = lockstep_blocker(job)
        if blocked:
            print(f"crisp: error: {blocked} is not allowed with hydra/launcher=lockstep: a fused group cannot apply "
                  f"it to each of its runs (job {job.idx}, {job.record['output_dir']}); use hydra/launcher=auto, "
                  "which trains such runs one process each", file=sys.stderr)
            raise SystemExit(2)


def refuse_unfused(groups: Sequence[Sequence[Job]], whys: Sequence[str | None] | None = None) -> None:
    """Lockstep forced on a group it cannot train: exit 2, before any run trains, with one line saying why
    (``whys``: :func:`why_not_in_lockstep` of each group, where the caller asked already)."""
    for group, why in zip(groups, whys or [why_not_in_lockstep(group[0]) for group in groups], strict=True):
        if why:
            print(f"crisp: error: lockstep cannot train {group[0].record['output_dir']} and the {len(group) - 1} other "
                  f"run(s) of its recipe: {why}; train them with hydra/launcher=auto (it runs them one process each)",
                  file=sys.stderr)
            raise SystemExit(2)


def can_fuse(job: Job) -> bool:
    """Whether lockstep can train this job's recipe (:func:`why_not_in_lockstep`)."""
    return why_not_in_lockstep(job) is None


def why_not_in_lockstep(job: Job) -> str | None:
    """Why lockstep cannot train this job's recipe, or None: a strategy (DDP, FSDP, ...), torch.compile, more than
    one device, a Trainer setting it cannot apply per run, or a model it cannot fuse
    (:func:`crisp.lockstep.fusable.why_not_fused`, decided from the model's config)."""
    trainer = job.config.trainer
    if str(trainer.strategy) not in ("auto", "single_device"):
        return f"trainer.strategy={trainer.strategy}: a fused group trains on one device, with a strategy of its own"
    if trainer.compile:
        return "trainer.compile=true: a fused group is not compiled"
    if str(trainer.devices) not in ("1", "auto"):
        return f"trainer.devices={trainer.devices}: a fused group trains on one device"
    blocked = lockstep_blocker(job)
    if blocked:
        return f"{blocked} cannot apply per run in a fused lockstep group"
    from crisp.lockstep.fusable import classifier_name, why_not_fused

    try:
        config = _model_config(job)
    except Exception:  # the worker meets the same problem and reports it
        return None
    why = why_not_fused(config)
    return f"{classifier_name(config)} cannot train in lockstep ({why})" if why else None


def group_jobs(jobs: Sequence[Job], max_runs: int | str | None, devices: int,
               memory: int | None = None) -> tuple[dict[int, JobReturn], list[list[Job]]]:
    """The groups a sweep's jobs train in, and the JobReturns of the jobs that need no training.

    A job needs none when an earlier job of the sweep trains the same run (the dense run, shared by
    every strategy's sparsity=0 job: one group must not hold a run twice) or when its run already
    completed with the same run_key. Both lockstep launchers, on this machine and on SLURM, group
    this way; ``memory`` is the bytes one group trains in, if not this machine's device (see :func:`capacity`).
    """
    returns: dict[int, JobReturn] = {}
    pending, owner = [], {}
    for job in jobs:
        if job.output_dir in owner:
            returns[job.idx] = job_return(job, {**job.record, "status": "skipped"})
            log.info("%s: the same run as job %d, trained once", job.record["output_dir"], owner[job.output_dir])
        elif results.is_completed(job.output_dir, job.record["run_key"]):
            returns[job.idx] = job_return(job, {**job.record, "status": "skipped"})
            log.info("%s: already completed in %s, skipped", job.record["output_dir"], job.output_dir)
        else:
            pending.append(job)
        owner.setdefault(job.output_dir, job.idx)
    cost = placement.cost_of(pending, _parameters) if devices > 1 else len
    groups = plan(pending, capacity(pending[0], max_runs, memory) if pending else None, devices, cost)
    for k, group in enumerate(groups):
        log.info("lockstep group %d: %d runs (%s)", k, len(group), ", ".join(job.record["output_dir"] for job in group))
    if devices > 1 and len(groups) > 1:
        costs = [cost(group) for group in groups]
        for gpu, tasks in enumerate(placement.placement(costs, devices)):
            log.info("lockstep: GPU slot %d expects groups %s (%.0f%% of the cost)", gpu, tasks,
                     100 * sum(costs[k] for k in tasks) / sum(costs))
    return returns, groups

