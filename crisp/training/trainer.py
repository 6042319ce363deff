"""The one Trainer factory: every run's ``pl.Trainer``, alone or as a lockstep group, is made here.

:func:`trainer_settings` turns the config's ``auto`` values into this machine's (accelerator, precision,
progress refresh, CUDA graphs, batch padding); :func:`make_trainer` builds the Trainer from them with the
callbacks every crisp run has (a progress bar, and :class:`Progress`, which keeps the sweep's heartbeat and
times training) and what the caller adds (a logger, its own callbacks, a device strategy).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import LightningEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import TQDMProgressBar

from crisp.core import heartbeat
from crisp.core.errors import ConfigError
from crisp.core.keys import CRISP_TRAINER_KEYS

# Lightning's start-up banner and tips, and warnings that say nothing about a crisp run
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


class Progress(pl.Callback):
    """Shows the sweep that this run is alive (:mod:`crisp.core.heartbeat`) and times training alone:
    from the moment every DDP rank is up to the end of the last epoch."""

    def __init__(self):
        self.train_seconds: float | None = None
        self._start = 0.0

    def on_train_start(self, trainer, module) -> None:
        heartbeat.beat(force=True)
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        heartbeat.beat()

    def on_validation_batch_end(self, *args) -> None:
        heartbeat.beat()

    def on_train_end(self, trainer, module) -> None:
        self.train_seconds = time.perf_counter() - self._start


def trainer_settings(cfg: DictConfig) -> dict[str, Any]:
    """Concrete accelerator, devices, precision and progress-bar refresh for this machine and job."""
    t = cfg.trainer
    accelerator = t.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = t.precision if t.precision != "auto" else ("bf16-mixed" if accelerator == "gpu" else "32-true")
    devices = t.devices  # parallel sweeps give each worker its GPU through CUDA_VISIBLE_DEVICES
    refresh = t.progress_refresh_rate
    if refresh == "auto":
        refresh = 50 if accelerator == "gpu" else 10
    ddp = "ddp" in str(t.strategy)
    one_gpu = accelerator == "gpu" and not ddp and not t.compile
    if t.cuda_graphs is True and not one_gpu:
        raise ConfigError(
            f"trainer.cuda_graphs=true is not allowed with trainer.accelerator={accelerator} "
            f"trainer.strategy={t.strategy} trainer.compile={t.compile}: it needs one GPU, no DDP, no compile"
        )
    cuda_graphs = one_gpu if t.cuda_graphs == "auto" else bool(t.cuda_graphs)
    pad = cfg.data.pad_to_multiple_of
    if pad is None:
        pad = 16 if cuda_graphs else 1  # graphs: a handful of batch shapes, each captured once
    return {"accelerator": accelerator, "devices": devices, "precision": precision, "refresh": refresh,
            "cuda_graphs": cuda_graphs, "pad_to_multiple_of": pad, "ddp": ddp}


def device_of(settings: dict[str, Any]) -> torch.device:
    """Where a run's model is built and calibrated: the GPU it trains on (with its index), or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if settings["accelerator"] == "gpu" \
        else torch.device("cpu")


def use_matmul_precision(cfg: DictConfig, settings: dict[str, Any]) -> None:
    if settings["accelerator"] == "gpu":
        torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)


def lightning_options(cfg: DictConfig) -> dict[str, Any]:
    """The Lightning arguments a user set under ``trainer`` beyond the ones :func:`make_trainer` resolves
    itself (``+trainer.accumulate_grad_batches=2``, ``+trainer.gradient_clip_val=1.0``, ...)."""
    resolved = {"accelerator", "devices", "strategy", "precision"}
    return {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
            if k not in CRISP_TRAINER_KEYS and k not in resolved}


# the Lightning arguments a lockstep group applies to each of its runs as a run alone applies them
PER_RUN_IN_LOCKSTEP = frozenset({"max_epochs", "log_every_n_steps", "deterministic", "enable_model_summary",
                                 "enable_progress_bar"})


def not_in_lockstep(cfg: DictConfig) -> list[str]:
    """The ``trainer`` settings a fused lockstep group cannot apply per run (those runs train one process each)."""
    return sorted(k for k in lightning_options(cfg) if k not in PER_RUN_IN_LOCKSTEP)


def make_trainer(cfg: DictConfig, settings: dict[str, Any], output_dir: Path, progress: Progress, *,
                 logger: Any = False, callbacks: list[pl.Callback] | None = None, strategy: Any = None,
                 devices: Any = None, checkpointing: bool | None = None) -> pl.Trainer:
    """A run's Trainer: ``cfg.trainer``'s Lightning settings (every Trainer argument it sets, see
    :mod:`crisp.core.keys`), crisp's progress bar and :class:`Progress`, and the caller's logger and callbacks.
    ``strategy``/``devices`` replace the config's (a lockstep group keeps its one device); ``checkpointing``
    replaces ``trainer.save_checkpoint``."""
    # crisp's defaults for Lightning's arguments; the config's own settings win
    options = {"enable_model_summary": False, "num_sanity_val_steps": 0, **lightning_options(cfg)}
    return pl.Trainer(
        accelerator=settings["accelerator"],
        devices=settings["devices"] if devices is None else devices,
        strategy=cfg.trainer.strategy if strategy is None else strategy,
        precision=settings["precision"],
        logger=logger,
        callbacks=[TQDMProgressBar(refresh_rate=settings["refresh"]), progress, *(callbacks or [])],
        # crisp starts DDP ranks itself (crisp/training/ddp.py): no cluster detection, which would import mpi4py
        # where it is installed and leave an Open MPI daemon behind every run
        plugins=[LightningEnvironment()],
        enable_checkpointing=cfg.trainer.save_checkpoint if checkpointing is None else checkpointing,
        default_root_dir=str(output_dir),
        **options,
    )


def timed_fit(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    """``trainer.fit``'s seconds, with the GPU's peak memory counted from its start (for results.json)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - start
