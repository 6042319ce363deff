"""One fine-tuning run in this process, from a validated config to what results.json records of it.

:func:`train` is what the run lifecycle (:mod:`crisp.core.lifecycle`) calls for a single run. The run is
built by :class:`crisp.training.builder.RunBuilder` and trained by a Trainer from
:func:`crisp.training.trainer.make_trainer`, as every run of a lockstep group is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from crisp.training import loggers
from crisp.training.builder import RunBuilder, check_hub
from crisp.training.classifier import SparseClassifier
from crisp.training.data import TaskDataModule
from crisp.training.ddp import use_crisp_rank_command
from crisp.training.outcome import run_outcome
from crisp.training.saved_model import save_model
from crisp.training.trainer import (
    Progress,
    device_of,
    make_trainer,
    timed_fit,
    trainer_settings,
    use_matmul_precision,
)


def train(cfg: DictConfig, config: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Train one run of a validated config in this process; returns what results.json records of it."""
    check_hub(cfg)
    settings = trainer_settings(cfg)
    use_matmul_precision(cfg, settings)
    # DDP ranks move the model to their own GPU: build it on the host
    device = torch.device("cpu") if settings["ddp"] else device_of(settings)
    built = RunBuilder(device).build(cfg, cfg.name)
    datamodule = TaskDataModule(
        cfg.data, built.train, built.vals, seed=cfg.seed, pad_to_multiple_of=settings["pad_to_multiple_of"],
        pin_memory=settings["accelerator"] == "gpu" if cfg.data.pin_memory == "auto" else bool(cfg.data.pin_memory),
    )
    module = SparseClassifier(built.encoder, cfg, built.task, cuda_graphs=settings["cuda_graphs"],
                              layer_sparsity=built.layer_sparsity)
    if cfg.trainer.compile:
        module.encoder = torch.compile(module.encoder, dynamic=True)
    logger = loggers.make_logger(cfg, config, output_dir)
    if settings["ddp"]:
        use_crisp_rank_command()
    progress = Progress()
    trainer = make_trainer(cfg, settings, output_dir, progress, logger=logger)
    environ = dict(os.environ)  # DDP leaves rank variables behind that would confuse the next run
    try:
        fit_seconds = timed_fit(trainer, module, datamodule)
    finally:
        wandb_run = loggers.finish(logger)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    if trainer.interrupted or len(module.history) < cfg.trainer.max_epochs:
        raise RuntimeError(f"training stopped after {len(module.history)} of {cfg.trainer.max_epochs} epochs")
    if cfg.trainer.save_weights and trainer.is_global_zero:
        save_model(output_dir, module.encoder, built.tokenizer)
    seen = len(datamodule.train) * len(module.history)
    peak = torch.cuda.max_memory_allocated() / 2**20 if settings["accelerator"] == "gpu" else None
    timing = {
        "fit_seconds": round(fit_seconds, 3),  # trainer.fit, DDP ranks' start included
        "train_seconds": round(progress.train_seconds, 3),  # training and validation epochs alone
        "train_samples_per_second": round(seen / progress.train_seconds, 1),
        "train_examples": len(datamodule.train),
        "peak_gpu_memory_mb": None if peak is None else round(peak, 1),
        "cuda_graphs": None if module.graphed_step is None else module.graphed_step.stats,
        "pad_to_multiple_of": settings["pad_to_multiple_of"],
        "precision": settings["precision"],
    }
    return run_outcome(built.task, module.history, module.layer_sparsity, module.last_layers,
                       built.calibration_entropy, timing, settings["accelerator"], wandb_run, built.trained_model)
