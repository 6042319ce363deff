"""Train a group of runs in lockstep, in this process: every run built as it would be alone.

:func:`train_group` puts the group through the one run lifecycle (:func:`crisp.core.lifecycle.attempt`:
claim, skip what completed, train, record), as a single run goes through it. Each run is built by the
one run builder (:class:`crisp.training.builder.RunBuilder`), exactly as a single run is; then the runs'
models are fused (:mod:`crisp.lockstep.fused`) and trained together by a Trainer from the one factory
(:func:`crisp.training.trainer.make_trainer`), and each run gets its own results.json (same schema and
run_key as alone), logger and statistics.
"""

from __future__ import annotations

import logging
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from pytorch_lightning.strategies import SingleDeviceStrategy

from crisp.core import lifecycle
from crisp.core.config import resolved_config
from crisp.core.errors import ConfigError
from crisp.lockstep.batches import GroupDataModule
from crisp.lockstep.dropout import RunRandom
from crisp.lockstep.fusable import why_not_fused
from crisp.lockstep.fused import fuse, run_state_dict
from crisp.lockstep.fused_classifier import FusedRun, LockstepClassifier
from crisp.lockstep.run_adamw import RunOptim
from crisp.sparsity.families import family_of
from crisp.training import loggers
from crisp.training.builder import BuiltRun, RunBuilder, check_hub
from crisp.training.data import round_up
from crisp.training.outcome import run_outcome
from crisp.training.saved_model import run_model, save_model
from crisp.training.trainer import (
    Progress,
    device_of,
    make_trainer,
    not_in_lockstep,
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


def train_group(runs: list[tuple[lifecycle.Run, DictConfig]], options: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of one recipe trained as one fused model; the outcome of each (see the module)."""
    members = [Member(run, cfg) for run, cfg in runs]
    by_run = {id(m.run): m for m in members}
    return lifecycle.attempt([m.run for m in members],
                             lambda todo: _train([by_run[id(run)] for run in todo], options))


def run_optim(cfg: DictConfig) -> RunOptim:
    return RunOptim(float(cfg.optim.lr), float(cfg.optim.weight_decay), float(cfg.optim.warmup_ratio))


def _train(members: list[Member], options: dict[str, Any]) -> None:
    # runs of equal optimizer settings side by side: each set is one slice of the fused parameters (RunAdamW)
    members = sorted(members, key=lambda m: astuple(run_optim(m.cfg)))
    cfg = members[0].cfg  # the group's shared recipe (the launcher groups jobs by it), but for what runs vary
    if not_in_lockstep(cfg):
        raise ConfigError(f"trainer.{not_in_lockstep(cfg)[0]} is not allowed in lockstep: a fused group cannot apply "
                          "it to each of its runs; train these runs with hydra/launcher=auto or parallel")
    check_hub(cfg)
    settings = trainer_settings(cfg)
    use_matmul_precision(cfg, settings)
    device = device_of(settings)
    builder = RunBuilder(device)
    for m in members:
        m.built = builder.build(m.cfg, m.run.name)
        m.model_config = m.built.encoder.config
        why = why_not_fused(m.model_config) if m is members[0] else None  # one recipe: one model for all
        if why:
            raise ConfigError(f"{type(m.built.encoder).__name__} cannot train in lockstep ({why}): train it with "
                              "hydra/launcher=auto (one process per run) or parallel")
        m.fused = FusedRun(m.run.name, m.built.layer_sparsity, run_optim(m.cfg), m.built.sparsifier_params or {})
    trains = [m.built.train for m in members]
    longest = max(int(s.lengths.max()) for m in members for s in (m.built.train, *m.built.vals))
    width = max(options.get("row_width", 64), round_up(longest, 16))
    random = RunRandom([m.cfg.seed for m in members], device)
    # every token id the runs' training batches can hold (0 pads packed rows)
    distinct = {id(s): s for s in trains}.values()
    trained_tokens = torch.cat([torch.zeros(1, dtype=torch.long), *(s.input_ids.flatten() for s in distinct)]).unique()
    encoder = fuse([m.built.encoder for m in members], random, trained_tokens,
                   projections=family_of(members[0].built.encoder).projections).to(device)
    for m in members:
        m.built.encoder = None  # fused now: the single models' tensors can go
    workers = options.get("pack_workers", "auto")
    vals = [list(split) for split in zip(*(m.built.vals for m in members), strict=True)]  # per split, each run's
    datamodule = GroupDataModule(trains, vals, [m.cfg.seed for m in members], cfg.data.batch_size,
                                 cfg.data.eval_batch_size, width, pin_memory=device.type == "cuda",
                                 workers=(2 if device.type == "cuda" else 0) if workers == "auto" else workers)
    for m in members:
        m.fused.logger = loggers.make_logger(m.cfg, resolved_config(m.cfg), m.output_dir) or None
    task = members[0].built.task
    module = LockstepClassifier(encoder, [m.fused for m in members], random, cfg, task,
                                cuda_graphs=settings["cuda_graphs"], on_failure=lambda run: _run_failed(members, run))
    progress = Progress()
    trainer = make_trainer(cfg, settings, members[0].output_dir, progress, callbacks=options.get("callbacks", []),
                           strategy=KeepOnDevice(device), devices=1, checkpointing=False)
    log.info("lockstep: training %d runs as one model (rows of %d tokens)", len(members), width)
    fit_seconds = timed_fit(trainer, module, datamodule)
    if trainer.interrupted:
        raise RuntimeError("training was interrupted")
    done = [m for m in members if m.run.result is None]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    seen = len(datamodule.train) * cfg.trainer.max_epochs
    group = {"runs": len(members), "completed": len(done), "row_width": width,
             "samples_per_second": round(seen * len(done) / progress.train_seconds, 1),
             "peak_gpu_memory_mb": None if peak is None else round(peak, 1)}
    for position, m in enumerate(done):
        if cfg.trainer.save_weights:
            model = run_model(m.model_config, run_state_dict(encoder, position), m.fused.layer_sparsity,
                              m.cfg.sparsifier)
            save_model(m.output_dir, model, m.built.tokenizer)
        m.run.complete(_outcome(m, seen, fit_seconds, progress.train_seconds, settings, module, group))


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


def _outcome(m: Member, seen: int, fit_seconds: float, train_seconds: float, settings: dict[str, Any],
             module: LockstepClassifier, group: dict[str, Any]) -> dict[str, Any]:
    run = m.fused
    timing = {
        "fit_seconds": round(fit_seconds, 3),  # the group's
        "train_seconds": round(train_seconds, 3),
        "train_samples_per_second": round(seen / train_seconds, 1),  # this run's share of the group's time
        "train_examples": len(m.built.train),
        "peak_gpu_memory_mb": None if group["peak_gpu_memory_mb"] is None
        else round(group["peak_gpu_memory_mb"] / group["runs"], 1),
        "cuda_graphs": None if module.graphed_step is None else module.graphed_step.stats,
        "precision": settings["precision"],
        "lockstep": group,
    }
    return run_outcome(m.built.task, run.history, run.layer_sparsity, run.layers, m.built.calibration_entropy, timing,
                       settings["accelerator"], loggers.finish(run.logger), m.built.trained_model)
