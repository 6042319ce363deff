"""The one Trainer factory: every run's ``pl.Trainer``, alone or as a lockstep group, is made here.

:func:`trainer_settings` turns the config's ``auto`` values into this machine's (accelerator, precision,
progress refresh, CUDA graphs, batch padding); :func:`make_trainer` builds the Trainer from them with the
callbacks every crisp run has (a progress bar, and :class:`Progress`, which keeps the sweep's heartbeat, says
where training is and times it) and what the caller adds (a logger, its callbacks, a device strategy, a
checkpoint IO). Every Lightning argument a user sets under ``trainer`` reaches it (:func:`lightning_options`);
:func:`not_in_lockstep` names those a fused lockstep group cannot apply to each of its runs.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
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
# a resumed run's data modules resume its batch order themselves (their state_dict: crisp.training.checkpoints)
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


class Progress(pl.Callback):
    """Shows the sweep that this run is alive and where it is (:func:`crisp.core.heartbeat.report`: runs, epoch,
    step of all, samples per second, time left) and times training alone: from the moment every DDP rank is up
    to the end of the last epoch. ``samples`` counts the training examples of this fit (all runs of a group)."""

    def __init__(self):
        self.train_seconds: float | None = None
        self.samples = 0
        self._start = 0.0
        self._first_batch = 0

    def on_train_start(self, trainer, module) -> None:
        heartbeat.beat(force=True)
        self._start = time.perf_counter()
        self._first_batch = self._batches(trainer)

    @staticmethod
    def _batches(trainer) -> int:
        """Training batches done in the whole fit (a resumed fit starts past 0)."""
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        per_epoch = trainer.num_training_batches
        return trainer.current_epoch * int(per_epoch) + done if math.isfinite(per_epoch) else done

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.samples += int(batch["labels"].numel()) if isinstance(batch, dict) and "labels" in batch else 0
        elapsed = time.perf_counter() - self._start
        per_epoch = trainer.num_training_batches
        if not math.isfinite(per_epoch) or not trainer.max_epochs or trainer.max_epochs < 1:
            heartbeat.beat()  # no length to measure progress against
            return
        total = int(trainer.max_epochs) * int(per_epoch)
        step = trainer.current_epoch * int(per_epoch) + batch_idx + 1
        rate = (step - self._first_batch) / elapsed if elapsed > 0 else 0.0
        heartbeat.report({"runs": len(getattr(module, "runs", [None])), "epoch": trainer.current_epoch + 1,
                          "epochs": int(trainer.max_epochs), "step": step, "steps": total,
                          "samples_per_s": self.samples / elapsed if elapsed > 0 else 0.0,
                          "eta_s": (total - step) / rate if rate > 0 else None},
                         force=step == self._first_batch + 1)  # the first at once, then every few seconds

    def on_validation_batch_end(self, *args) -> None:
        heartbeat.beat()

    def elapsed(self) -> float:
        """Seconds since training started (a run that leaves its group early is timed by it)."""
        return time.perf_counter() - self._start

    def on_train_end(self, trainer, module) -> None:
        self.train_seconds = time.perf_counter() - self._start


def trainer_settings(cfg: DictConfig) -> dict[str, Any]:
    """Concrete accelerator, devices, precision and progress-bar refresh for this machine and job."""
    t = cfg.trainer
    accelerator = "gpu" if t.accelerator == "cuda" else t.accelerator  # Lightning's two names for an NVIDIA GPU
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
    itself (``trainer.accumulate_grad_batches=2``, ``trainer.gradient_clip_val=1.0``, ``+trainer.max_time=...``)."""
    resolved = {"accelerator", "devices", "strategy", "precision"}
    return {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
            if k not in CRISP_TRAINER_KEYS and k not in resolved}


@functools.cache
def lightning_defaults() -> dict[str, Any]:
    """``pl.Trainer``'s own default for each of its arguments."""
    return {name: p.default for name, p in inspect.signature(pl.Trainer.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def user_options(cfg: DictConfig) -> dict[str, Any]:
    """The Lightning arguments whose value is not Lightning's own default: what a user changed."""
    defaults = lightning_defaults()
    return {k: v for k, v in lightning_options(cfg).items() if k not in defaults or v != defaults[k]}


# the Lightning arguments a lockstep group applies to each of its runs as a run alone applies them: the loop's
# schedule (the same for every run), gradient clipping by each run's own norm, accumulation, the validation
# interval (each run's logger gets every validation)
PER_RUN_IN_LOCKSTEP = frozenset({
    "max_epochs", "max_steps", "log_every_n_steps", "deterministic", "benchmark", "enable_model_summary",
    "enable_progress_bar", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
    "val_check_interval", "check_val_every_n_epoch", "limit_train_batches", "limit_val_batches",
    "num_sanity_val_steps", "detect_anomaly", "inference_mode"})
# with CUDA graphs crisp steps the optimizer itself (manual optimization, which Lightning refuses these
# with): the module applies them (crisp.training.cuda_graphs.GraphedTrainStep.optimizer_step)
MANUAL = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")


def not_in_lockstep(cfg: DictConfig) -> list[str]:
    """The ``trainer`` settings a fused lockstep group cannot apply per run (those runs train one process each)."""
    return sorted(f"trainer.{k}" for k in user_options(cfg) if k not in PER_RUN_IN_LOCKSTEP)


def lockstep_blockers(cfg: DictConfig) -> list[str]:
    """What a fused lockstep group cannot apply to each of its runs: trainer settings, callbacks and data loader
    workers (a group packs its batches with ``hydra.launcher.pack_workers``), by name."""
    from crisp.training.callbacks import not_in_lockstep as callbacks_not_in_lockstep

    workers = [f"data.num_workers={cfg.data.num_workers}"] if cfg.data.get("num_workers") else []
    return not_in_lockstep(cfg) + callbacks_not_in_lockstep(cfg) + workers


def manual_settings(cfg: DictConfig) -> dict[str, Any]:
    """Accumulation and clipping as a module in manual optimization applies them itself."""
    options = lightning_options(cfg)
    return {"accumulate": int(options.get("accumulate_grad_batches") or 1),
            "clip_val": options.get("gradient_clip_val"),
            "clip_algorithm": str(options.get("gradient_clip_algorithm") or "norm").lower()}


def stepping_batches(module: pl.LightningModule, accumulate: int) -> int | float:
    """The optimizer steps of the whole fit (for the learning-rate schedule): Lightning's estimate, counting
    the accumulation a module in manual optimization applies itself (Lightning's count sees none)."""
    trainer = module.trainer
    if module.automatic_optimization or accumulate == 1:
        return trainer.estimated_stepping_batches
    trainer.estimated_stepping_batches  # noqa: B018 (loads the training data's length when not loaded yet)
    steps = math.ceil(trainer.num_training_batches / accumulate) * max(trainer.max_epochs, 1)
    return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps


def make_trainer(cfg: DictConfig, settings: dict[str, Any], output_dir: Path, progress: Progress, *,
                 logger: Any = False, callbacks: list[pl.Callback] | None = None, strategy: Any = None,
                 devices: Any = None, plugins: list | None = None) -> pl.Trainer:
    """A run's Trainer: ``cfg.trainer``'s Lightning settings (every Trainer argument it sets, see
    :mod:`crisp.core.keys`), crisp's progress bar and :class:`Progress`, and the caller's logger and callbacks
    (its checkpointing among them: Lightning's own is on only with a Checkpoint there).
    ``strategy``/``devices`` replace the config's (a lockstep group keeps its one device); ``plugins`` come
    after crisp's cluster environment (a checkpoint IO)."""
    from pytorch_lightning.callbacks import Checkpoint

    # crisp's defaults for Lightning's arguments; the config's own settings win
    options = {"enable_model_summary": False, "num_sanity_val_steps": 0, **lightning_options(cfg)}
    if settings["cuda_graphs"]:  # manual optimization: the module accumulates and clips (manual_settings)
        options = {k: v for k, v in options.items() if k not in MANUAL}
    callbacks = list(callbacks or [])
    return pl.Trainer(
        accelerator=settings["accelerator"],
        devices=settings["devices"] if devices is None else devices,
        strategy=cfg.trainer.strategy if strategy is None else strategy,
        precision=settings["precision"],
        logger=logger,
        callbacks=[TQDMProgressBar(refresh_rate=settings["refresh"]), progress, *callbacks],
        # crisp starts DDP ranks itself (crisp/training/ddp.py): no cluster detection, which would import mpi4py
        # where it is installed and leave an Open MPI daemon behind every run
        plugins=[LightningEnvironment(), *(plugins or [])],
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
        default_root_dir=str(output_dir),
        **options,
    )


def timed_fit(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule,
              ckpt_path: Path | None = None) -> float:
    """``trainer.fit``'s seconds (from ``ckpt_path``, resuming), with the GPU's peak memory counted from its
    start (for results.json)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return time.perf_counter() - start
