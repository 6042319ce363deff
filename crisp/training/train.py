"""One fine-tuning run in this process, from a validated config to what results.json records of it.

:func:`train` is what the run lifecycle (:mod:`crisp.core.lifecycle`) calls for a single run. The run is
built by :class:`crisp.training.builder.RunBuilder` and trained by a Trainer from
:func:`crisp.training.trainer.make_trainer`, as every run of a lockstep group is, with the callbacks its
config picks (:mod:`crisp.training.callbacks`). With checkpointing on, an interrupted run resumes from its
last checkpoint (:mod:`crisp.training.checkpoints`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from crisp.core.results import run_key
from crisp.training import callbacks as user_callbacks
from crisp.training import checkpoints, loggers
from crisp.training.builder import RunBuilder, check_hub
from crisp.training.classifier import SparseClassifier
from crisp.training.data import TaskDataModule, pin_memory
from crisp.training.ddp import use_crisp_rank_command
from crisp.training.outcome import run_outcome, stopped_early
from crisp.training.saved_model import save_model
from crisp.training.tasks import task_of
from crisp.training.trainer import (
    Progress,
    device_of,
    make_trainer,
    timed_fit,
    trainer_settings,
    use_matmul_precision,
)

log = logging.getLogger("crisp")


def train(cfg: DictConfig, config: dict[str, Any], output_dir: Path, *, written: dict[str, Any] | None = None,
          sweep_id: str | None = None) -> dict[str, Any]:
    """Train one run of a validated config in this process; returns what results.json records of it.
    ``written``: the config as written (its W&B group); ``sweep_id``: the sweep it belongs to."""
    check_hub(cfg)
    callbacks = user_callbacks.build(cfg, task_of(cfg.data), output_dir)  # a bad one fails before the model loads
    settings = trainer_settings(cfg)
    use_matmul_precision(cfg, settings)
    # DDP ranks move the model to their own GPU: build it on the host
    device = torch.device("cpu") if settings["ddp"] else device_of(settings)
    built = RunBuilder(device).build(cfg, cfg.name)
    datamodule = TaskDataModule(
        cfg.data, built.train, built.vals, seed=cfg.seed, pad_to_multiple_of=settings["pad_to_multiple_of"],
        pin_memory=pin_memory(cfg.data, settings["accelerator"] == "gpu"),
    )
    module = SparseClassifier(built.encoder, cfg, built.task, cuda_graphs=settings["cuda_graphs"],
                              layer_sparsity=built.layer_sparsity)
    if cfg.trainer.compile:
        module.encoder = torch.compile(module.encoder, dynamic=True)
    key = run_key(config)
    keeping = checkpoints.checkpointing(cfg)
    resume_from = checkpoints.resume_point(output_dir, key)
    resume = None if resume_from is None else checkpoints.resumed_logger(resume_from)
    if resume_from is not None:
        log.info("%s: resuming from %s (step %d)", cfg.name, resume_from, resume["global_step"])
    plugins = []
    if keeping is not None:
        callbacks.append(checkpoints.ResumeCheckpoint(output_dir / checkpoints.DIR / checkpoints.LAST,
                                                      keeping.every_n_steps, keeping.every_n_epochs))
    if keeping is not None or resume_from is not None:
        plugins.append(checkpoints.RunCheckpointIO(output_dir, key))
    logger = loggers.make_logger(cfg, config, output_dir, written=written, sweep_id=sweep_id, resume=resume)
    module.resume_info = {"run_key": key, "wandb_id": loggers.wandb_id(logger)}
    if settings["ddp"]:
        use_crisp_rank_command()
    progress = Progress()
    trainer = make_trainer(cfg, settings, output_dir, progress, logger=logger, callbacks=callbacks, plugins=plugins)
    environ = dict(os.environ)  # DDP leaves rank variables behind that would confuse the next run
    outcome = None
    try:
        fit_seconds = timed_fit(trainer, module, datamodule, ckpt_path=resume_from)
        stopped = stopped_early(trainer, callbacks, len(module.history), cfg.trainer.max_epochs)
        if trainer.interrupted or not module.history or (stopped is None
                                                         and len(module.history) < cfg.trainer.max_epochs):
            raise RuntimeError(f"training stopped after {len(module.history)} of {cfg.trainer.max_epochs} epochs")
        if cfg.trainer.save_weights and trainer.is_global_zero:
            save_model(output_dir, module.encoder, built.tokenizer)
        peak = torch.cuda.max_memory_allocated() / 2**20 if settings["accelerator"] == "gpu" else None
        timing = {
            "fit_seconds": round(fit_seconds, 3),  # trainer.fit, DDP ranks' start included
            "train_seconds": round(progress.train_seconds, 3),  # training and validation epochs alone
            "train_samples_per_second": round(progress.samples / progress.train_seconds, 1),
            "train_examples": len(datamodule.train),
            "peak_gpu_memory_mb": None if peak is None else round(peak, 1),
            "cuda_graphs": None if module.graphed_step is None else module.graphed_step.stats,
            "pad_to_multiple_of": settings["pad_to_multiple_of"],
            "precision": settings["precision"],
        }
        outcome = run_outcome(built.task, module.history, module.layer_sparsity, module.last_layers,
                              built.calibration_entropy, timing, settings["accelerator"], None,
                              resumed_from_step=module.resumed_from_step, stopped=stopped,
                              trained_model=built.trained_model)
    finally:
        wandb_run = loggers.finish(logger, outcome)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    if keeping is None or not keeping.keep:
        checkpoints.remove(output_dir)
    return {**outcome, "wandb": wandb_run}
