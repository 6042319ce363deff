"""One fine-tuning run, from a validated config to the numbers that go into results.json.

:func:`train` is what the run lifecycle (:mod:`crisp.core.lifecycle`) calls for a single run; a lockstep
group builds its runs the same way and shares :func:`trainer_settings`, :func:`environment`,
:func:`epochs_summary` and :class:`Progress` with it.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import transformers
from lightning_fabric.plugins.environments import LightningEnvironment
from omegaconf import DictConfig
from pytorch_lightning.callbacks import TQDMProgressBar

import crisp
from crisp.core import heartbeat
from crisp.core.errors import ConfigError
from crisp.sparsity.families import family_of
from crisp.training import loggers
from crisp.training.classifier import SparseClassifier
from crisp.training.data import TaskDataModule, load
from crisp.training.ddp import use_crisp_rank_command
from crisp.training.encoder import build_encoder, build_tokenizer
from crisp.training.hub import resolve_model
from crisp.training.tasks import Task

REPO = Path(__file__).resolve().parents[2]

# Lightning's start-up banner and tips, and warnings that say nothing about a crisp run
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(accelerator: str) -> dict[str, Any]:
    device = torch.cuda.get_device_name() if accelerator == "gpu" else platform.processor() or platform.machine()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": pl.__version__,
        "crisp": crisp.__version__,
        "accelerator": accelerator,
        "device": device,
        "host": platform.node(),
        "pid": os.getpid(),
        "git_commit": _git_commit(),
    }


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


def train(cfg: DictConfig, config: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Train one run of a validated config in this process; returns what results.json records of it.

    The seed is applied twice, before the data (batch order, synthetic data) and before the model's
    initialisation, so a run's numbers depend on its seed alone, not on what ran before it."""
    if cfg.model.name_or_path:
        resolve_model(cfg.model.name_or_path)  # an unreachable hub fails now, not after the data
    settings = trainer_settings(cfg)
    if settings["accelerator"] == "gpu":
        torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    task, splits = load(cfg.data)
    tokenizer = build_tokenizer(cfg.model, splits["train"].texts)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the model's random init depends on the seed only
    encoder = build_encoder(cfg.model, tokenizer, task, dropout=cfg.dropout)
    heartbeat.beat(force=True)
    datamodule = TaskDataModule(
        cfg.data, tokenizer, splits, seed=cfg.seed, pad_to_multiple_of=settings["pad_to_multiple_of"],
        pin_memory=settings["accelerator"] == "gpu" if cfg.data.pin_memory == "auto" else bool(cfg.data.pin_memory),
        token_types=family_of(encoder).token_types,
    )
    module = SparseClassifier(encoder, cfg, task, cuda_graphs=settings["cuda_graphs"])
    if cfg.trainer.compile:
        module.encoder = torch.compile(module.encoder, dynamic=True)
    logger = loggers.make_logger(cfg, config, output_dir)
    if settings["ddp"]:
        use_crisp_rank_command()
    progress = Progress()
    trainer = pl.Trainer(
        accelerator=settings["accelerator"],
        devices=settings["devices"],
        strategy=cfg.trainer.strategy,
        precision=settings["precision"],
        max_epochs=cfg.trainer.max_epochs,
        logger=logger,
        callbacks=[TQDMProgressBar(refresh_rate=settings["refresh"]), progress],
        # crisp starts DDP ranks itself (crisp/training/ddp.py): no cluster detection, which would import mpi4py
        # where it is installed and leave an Open MPI daemon behind every run
        plugins=[LightningEnvironment()],
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_checkpointing=cfg.trainer.save_checkpoint,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=cfg.trainer.deterministic,
        default_root_dir=str(output_dir),
    )
    wandb_run = None
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
    if cfg.trainer.save_weights:
        save_weights(output_dir, dict(module.encoder.named_parameters()))
    return summarize(module, datamodule, settings, fit_seconds, progress.train_seconds, wandb_run, task)


def timed_fit(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    """``trainer.fit``'s seconds, with the GPU's peak memory counted from its start (for results.json)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - start


def save_weights(output_dir: Path, params: dict[str, torch.Tensor]) -> None:
    """``model.safetensors``: the fine-tuned encoder's parameters (``trainer.save_weights=true``)."""
    from safetensors.torch import save_file

    save_file({name: t.detach().float().cpu().contiguous() for name, t in params.items()},
              str(output_dir / "model.safetensors"))


def epochs_summary(history: list[dict], task: Task) -> dict[str, Any]:
    """The history, the final epoch's validation numbers and the best epoch by the task's primary metric."""
    final = history[-1]
    best = max(history, key=lambda r: r[task.primary])  # first epoch wins a tie
    validation = [k for k in final if k.startswith("val_")]
    return {
        "metric": task.primary,  # the one the report compares
        "metrics": [f"val_{m}{suffix}" for suffix in task.splits for m in task.recorded],
        "labels": None if task.regression else list(task.labels),  # class names in id order
        "regression": list(task.target_range) if task.regression else None,
        "history": history,
        "final": {k: final[k] for k in (*validation, "epoch")},
        "best": {task.primary: best[task.primary], "val_loss": best["val_loss"], "epoch": best["epoch"]},
    }


def layers_summary(configured: list[float], layers: dict[str, list[float]],
                   calibration_entropy: list[float] | None) -> dict[str, Any]:
    """Per layer: the configured sparsity, the achieved one in training and validation, the entropies."""
    return {
        "configured": configured,
        "achieved": layers.get("train_achieved"),
        "achieved_val": layers.get("val_achieved"),
        "entropy": layers.get("val_entropy"),
        "entropy_train": layers.get("train_entropy"),
        "calibration_entropy": calibration_entropy,
    }


def summarize(module: SparseClassifier, datamodule, settings, fit_seconds: float, train_seconds: float,
              wandb_run, task: Task) -> dict[str, Any]:
    history = module.history
    layers = module.last_layers
    seen = len(datamodule.train) * len(history)
    peak = torch.cuda.max_memory_allocated() / 2**20 if settings["accelerator"] == "gpu" else None
    return {
        "layers": layers_summary(module.layer_sparsity, layers,
                                 getattr(module.encoder, "crisp_calibration_entropy", None)),
        **epochs_summary(history, task),
        "timing": {
            "fit_seconds": round(fit_seconds, 3),  # trainer.fit, DDP ranks' start included
            "train_seconds": round(train_seconds, 3),  # training and validation epochs alone
            "train_samples_per_second": round(seen / train_seconds, 1),
            "train_examples": len(datamodule.train),
            "peak_gpu_memory_mb": None if peak is None else round(peak, 1),
            "cuda_graphs": None if module.graphed_step is None else module.graphed_step.stats,
            "pad_to_multiple_of": settings["pad_to_multiple_of"],
            "precision": settings["precision"],
        },
        "environment": environment(settings["accelerator"]),
        "wandb": wandb_run,
    }
