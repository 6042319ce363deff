"""Train a group of runs in lockstep, in this process: every run built as it would be alone.

:func:`train_group` puts the group through the one run lifecycle (:func:`crisp.core.lifecycle.attempt`:
claim, skip what completed, train, record), as a single run goes through it. Each run is built by the
one run builder (:class:`crisp.training.builder.RunBuilder`), exactly as a single run is; then the runs'
models are fused (:mod:`crisp.lockstep.fused`) and trained together by a Trainer from the one factory
(:func:`crisp.training.trainer.make_trainer`), and each run gets its own results.json (same schema and
run_key as alone), logger and statistics. A run that early stopping stops completes and leaves the group
(:mod:`crisp.lockstep.per_run`); with checkpointing on, each run keeps its own checkpoint and an interrupted
group resumes from them (:mod:`crisp.lockstep.checkpoints`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from pytorch_lightning.strategies import SingleDeviceStrategy

from crisp.core import lifecycle
from crisp.core.config import resolved_config, written_config
from crisp.core.errors import ConfigError
from crisp.lockstep.batches import GroupDataModule
from crisp.lockstep.checkpoints import GroupCheckpointIO, positions
from crisp.lockstep.dropout import RunRandom
from crisp.lockstep.fusable import why_not_fused
from crisp.lockstep.fused import fuse, run_state_dict
from crisp.lockstep.fused_classifier import FusedRun, LockstepClassifier
from crisp.lockstep.options import GroupOptions
from crisp.lockstep.per_run import RunStopping, per_run_callbacks
from crisp.lockstep.run_adamw import RunOptim
from crisp.sparsity.families import family_of
from crisp.training import checkpoints as run_checkpoints
from crisp.training import loggers
from crisp.training.builder import BuiltRun, RunBuilder, check_hub
from crisp.training.checkpoints import checkpointing
from crisp.training.data import pin_memory, round_up
from crisp.training.outcome import run_outcome
from crisp.training.saved_model import run_model, save_model
from crisp.training.trainer import (
    Progress,
    device_of,
    lockstep_blockers,
    make_trainer,
    timed_fit,
    trainer_settings,
    use_matmul_precision,
)

log = logging.getLogger("crisp")


@dataclass
class Member:
    """One run of the group while it is set up and trained."""

    run: lifecycle.Run
    cfg: DictConfig  # the run's config, without Hydra's section
    built: BuiltRun | None = None
    fused: FusedRun | None = None  # the run as the fused module sees it
    model_config: Any = None  # its own model's config (its dropout), to save it as its own model

    @property
    def output_dir(self) -> Path:
        return self.run.output_dir


def train_group(runs: list[tuple[lifecycle.Run, DictConfig]], options: GroupOptions) -> list[dict[str, Any]]:
    """Every run of one recipe trained as one fused model; the outcome of each (see the module)."""
    members = [Member(run, cfg) for run, cfg in runs]
    by_run = {id(m.run): m for m in members}
    return lifecycle.attempt([m.run for m in members],
                             lambda todo: _train_resumable([by_run[id(run)] for run in todo], options))


def run_optim(cfg: DictConfig) -> RunOptim:
    return RunOptim(float(cfg.optim.lr), float(cfg.optim.weight_decay), float(cfg.optim.warmup_ratio))


def _train_resumable(members: list[Member], options: GroupOptions) -> None:
    """The runs that resume from one checkpoint position (or start afresh) train together, one set after another:
    a group steps all its runs at once, so they must stand at the same step."""
    found = positions([m.output_dir for m in members], [m.run.record["run_key"] for m in members])
    sets: dict[Any, list[Member]] = {}
    for m, where in zip(members, found, strict=True):
        sets.setdefault(where, []).append(m)
    if len(sets) > 1:
        log.info("lockstep: the runs resume from %d different points: %d groups, one after another", len(sets),
                 len(sets))
    for where, part in sets.items():
        _train(part, options, resume=where is not None)


def _train(members: list[Member], options: GroupOptions, resume: bool = False) -> None:
    # runs of equal optimizer settings side by side: each set is one slice of the fused parameters (RunAdamW)
    members = sorted(members, key=lambda m: tuple(run_optim(m.cfg)))
    cfg = members[0].cfg  # the group's shared recipe (the launcher groups jobs by it), but for what runs vary
    blockers = lockstep_blockers(cfg)
    if blockers:
        raise ConfigError(f"{blockers[0]} is not allowed in lockstep: a fused group cannot apply it to each of its "
                          "runs; train these runs with hydra/launcher=auto or parallel")
    check_hub(cfg)
    settings = trainer_settings(cfg)
    use_matmul_precision(cfg, settings)
    device = device_of(settings)
    builder = RunBuilder(device)
    stoppers, monitors = per_run_callbacks(cfg, members[0].output_dir)
    for m in members:
        m.built = builder.build(m.cfg, m.run.name)
        m.model_config = m.built.encoder.config
        why = why_not_fused(m.model_config) if m is members[0] else None  # one recipe: one model for all
        if why:
            raise ConfigError(f"{type(m.built.encoder).__name__} cannot train in lockstep ({why}): train it with "
                              "hydra/launcher=auto (one process per run) or parallel")
        m.fused = FusedRun(m.run.name, m.built.layer_sparsity, run_optim(m.cfg), m.built.sparsifier_params or {},
                           output_dir=m.output_dir,
                           run_key=m.run.record["run_key"],
                           stopping=RunStopping(stoppers) if stoppers else None)
    trains = [m.built.train for m in members]
    longest = max(int(s.lengths.max()) for m in members for s in (m.built.train, *m.built.vals))
    width = max(options.row_width, round_up(longest, cfg.data.pad_to_multiple_of or 16))
    random = RunRandom([m.cfg.seed for m in members], device)
    # every token id the runs' training batches can hold (0 pads packed rows)
    distinct = {id(s): s for s in trains}.values()
    trained_tokens = torch.cat([torch.zeros(1, dtype=torch.long), *(s.input_ids.flatten() for s in distinct)]).unique()
    encoder = fuse([m.built.encoder for m in members], random, trained_tokens,
                   projections=family_of(members[0].built.encoder).projections).to(device)
    for m in members:
        m.built.encoder = None  # fused now: the single models' tensors can go
    workers = options.pack_workers
    vals = [list(split) for split in zip(*(m.built.vals for m in members), strict=True)]  # per split, each run's
    on_gpu = device.type == "cuda"
    datamodule = GroupDataModule(trains, vals, [m.cfg.seed for m in members], cfg.data.batch_size,
                                 cfg.data.eval_batch_size, width, pin_memory=pin_memory(cfg.data, on_gpu),
                                 workers=(2 if on_gpu else 0) if workers == "auto" else workers)
    for m in members:
        resumed = run_checkpoints.resumed_logger(m.output_dir / run_checkpoints.DIR / run_checkpoints.LAST) \
            if resume else None
        m.fused.logger = loggers.make_logger(m.cfg, resolved_config(m.cfg), m.output_dir, written=written_config(m.cfg),
                                             sweep_id=options.sweep_id, resume=resumed) or None
        m.fused.wandb_id = loggers.wandb_id(m.fused.logger or False)
    task = members[0].built.task
    progress = Progress()
    group: dict[str, Any] = {"runs": len(members), "row_width": width}
    module = LockstepClassifier(encoder, [m.fused for m in members], random, cfg, task,
                                cuda_graphs=settings["cuda_graphs"], on_failure=lambda run: _run_failed(members, run),
                                on_stop=lambda run, position: _run_stopped(members, run, position, module, progress,
                                                                           settings, group),
                                learning_rates=monitors)
    keeping, io = checkpointing(cfg), GroupCheckpointIO()
    io.module = module
    callbacks = list(options.callbacks)
    first_checkpoint = members[0].output_dir / run_checkpoints.DIR / run_checkpoints.LAST
    if keeping is not None:
        callbacks.append(run_checkpoints.ResumeCheckpoint(first_checkpoint, keeping.every_n_steps,
                                                          keeping.every_n_epochs))
    trainer = make_trainer(cfg, settings, members[0].output_dir, progress, callbacks=callbacks,
                           strategy=KeepOnDevice(device, checkpoint_io=io), devices=1)
    log.info("lockstep: training %d runs as one model (rows of %d tokens)%s", len(members), width,
             f", resuming from step {run_checkpoints.read_info(first_checkpoint.parent).get('global_step')}"
             if resume else "")
    fit_seconds = timed_fit(trainer, module, datamodule, ckpt_path=first_checkpoint if resume else None)
    if trainer.interrupted:
        raise RuntimeError("training was interrupted")
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:  # as a run alone says it stopped
        for run in module.runs:
            if run.stopped is None and len(run.history) < cfg.trainer.max_epochs:
                run.stopped = {"epoch": trainer.current_epoch, "step": trainer.global_step, "by": "trainer.max_steps"}
    # each run still in the group, at its place in the fused model, that no early stop completed already
    done = [(position, m) for position, run in enumerate(module.runs) for m in members
            if m.fused is run and m.run.result is None]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    group.update({"completed": len(done), "peak_gpu_memory_mb": None if peak is None else round(peak, 1)})
    for position, m in done:
        if cfg.trainer.save_weights:
            _save_run(m, encoder, position)
        m.run.complete(_outcome(m, fit_seconds, progress, settings, module, group))
        if keeping is None or not keeping.keep:
            run_checkpoints.remove(m.output_dir)


def _save_run(m: Member, encoder: torch.nn.Module, position: int) -> None:
    """``trainer.save_weights``: the run as its own model, a folder transformers loads sparse
    (:func:`crisp.save_pretrained`)."""
    model = run_model(m.model_config, run_state_dict(encoder, position), m.fused.layer_sparsity, m.cfg.sparsifier)
    save_model(m.output_dir, model, m.built.tokenizer)


class KeepOnDevice(SingleDeviceStrategy):
    """Lightning's one-device strategy, but its teardown leaves the model and the optimizer's state where
    they are: it copies them to the host (some 15 GB for 70 MiniLM runs, seconds of a grid's time)
    only for this process to free them; the runs' weights are saved from the device."""

    def teardown(self) -> None:
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def _run_failed(members: list[Member], run: FusedRun) -> None:
    member = next(m for m in members if m.fused is run)
    member.run.fail(run.error)
    loggers.finish(run.logger)
    run_checkpoints.remove(member.output_dir)  # it left: a later attempt trains it from the start


def _run_stopped(members: list[Member], run: FusedRun, position: int, module: LockstepClassifier, progress: Progress,
                 settings: dict[str, Any], group: dict[str, Any]) -> None:
    """Early stopping stopped ``run`` (at ``position`` in the fused model): it completes now, with its history so
    far and its weights as they are, and leaves the group."""
    member = next(m for m in members if m.fused is run)
    if member.cfg.trainer.save_weights:
        _save_run(member, module.encoder, position)
    elapsed = progress.elapsed()
    member.run.complete(_outcome(member, elapsed, progress, settings, module, {**group, "peak_gpu_memory_mb": None},
                                 seconds=elapsed))
    keeping = checkpointing(member.cfg)
    if keeping is None or not keeping.keep:
        run_checkpoints.remove(member.output_dir)


def _outcome(m: Member, fit_seconds: float, progress: Progress, settings: dict[str, Any],
             module: LockstepClassifier, group: dict[str, Any], seconds: float | None = None) -> dict[str, Any]:
    run = m.fused
    train_seconds = progress.train_seconds if seconds is None else seconds
    seen = progress.samples / max(1, group["runs"])  # this run's share of the group's examples
    timing = {
        "fit_seconds": round(fit_seconds, 3),  # the group's
        "train_seconds": round(train_seconds, 3),
        "train_samples_per_second": round(seen / train_seconds, 1) if train_seconds else None,
        "train_examples": len(m.built.train),
        "peak_gpu_memory_mb": None if group.get("peak_gpu_memory_mb") is None
        else round(group["peak_gpu_memory_mb"] / group["runs"], 1),
        "cuda_graphs": None if module.graphed_step is None else module.graphed_step.stats,
        "precision": settings["precision"],
        "lockstep": {**group, "samples_per_second": round(progress.samples / train_seconds, 1)
                     if train_seconds else None},
    }
    outcome = run_outcome(m.built.task, run.history, run.layer_sparsity, run.layers, m.built.calibration_entropy,
                          timing, settings["accelerator"], None, resumed_from_step=module.resumed_from_step,
                          stopped=run.stopped, trained_model=m.built.trained_model)
    return {**outcome, "wandb": loggers.finish(run.logger, outcome)}
