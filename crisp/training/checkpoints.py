"""A run's checkpoint to resume from: ``<run>/checkpoints/last.ckpt``, and the same command resumes from it.

With ``trainer.checkpoint_every_n_steps`` (or ``checkpoint_every_n_epochs``) a run keeps one checkpoint,
overwritten as it trains, written by Lightning (``trainer.save_checkpoint``, through a checkpoint IO that
writes a temp file and renames it): the model, the optimizer and schedule, Lightning's loops (epoch and
batch position), the data module's position in the run's own batch order, and crisp's own state of the
run (:meth:`crisp.training.classifier.SparseClassifier.on_save_checkpoint`: its history, the epoch's
running sums, the random states). Beside it ``last.json`` says which run (its run_key) and where
(:func:`resume_point` reads it). The run lifecycle's next attempt at the run finds it and trains on from
there (``trainer.fit(ckpt_path=...)``); results.json then records ``resumed_from_step``. Once the run
completes, the checkpoint is removed unless ``trainer.keep_checkpoint`` (or ``trainer.save_checkpoint``).

Step-based saves skip the batches after which Lightning validates or the epoch ends: the save that
follows the validation, at the epoch's end, holds that point whole.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Checkpoint

from crisp.core import results

log = logging.getLogger("crisp")
DIR, LAST, INFO = "checkpoints", "last.ckpt", "last.json"


@dataclass(frozen=True)
class Checkpointing:
    every_n_steps: int | None
    every_n_epochs: int | None
    keep: bool


def checkpointing(cfg: DictConfig) -> Checkpointing | None:
    """When the run keeps a checkpoint to resume from, if at all (``save_checkpoint``: every epoch, kept)."""
    t = cfg.trainer
    steps, epochs = t.get("checkpoint_every_n_steps"), t.get("checkpoint_every_n_epochs")
    if t.get("save_checkpoint") and steps is None and epochs is None:
        epochs = 1
    if steps is None and epochs is None:
        return None
    return Checkpointing(steps, epochs, bool(t.get("keep_checkpoint") or t.get("save_checkpoint")))


def position(trainer: pl.Trainer) -> dict[str, int]:
    """Where training is, as the next batch to train: its epoch and how many of the epoch's batches are done."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    epoch, per_epoch = trainer.current_epoch, int(trainer.num_training_batches)
    if done >= per_epoch:
        epoch, done = epoch + 1, 0
    return {"epoch": epoch, "batches": done, "per_epoch": per_epoch, "global_step": trainer.global_step}


def resume_point(run_dir: Path, run_key: str) -> Path | None:
    """The checkpoint of this run (same run_key) in ``run_dir``, or None."""
    info = results.read(Path(run_dir) / DIR / INFO)
    ckpt = Path(run_dir) / DIR / LAST
    if info and info.get("run_key") == run_key and ckpt.is_file():
        return ckpt
    if ckpt.is_file():
        log.warning("%s holds a checkpoint of another run (its run_key differs): training from the start", run_dir)
    return None


def remove(run_dir: Path) -> None:
    """The run completed: its resume checkpoint goes (the folder too, when nothing else is in it)."""
    folder = Path(run_dir) / DIR
    for name in (INFO, LAST):
        (folder / name).unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def write_info(run_dir: Path, run_key: str, where: dict[str, Any], wandb_id: str | None = None) -> None:
    results.write_atomic(Path(run_dir) / DIR / INFO, {"run_key": run_key, **where, "wandb_id": wandb_id})


def save_file(checkpoint: dict[str, Any], path: Path) -> None:
    """A checkpoint written whole or not at all (a temp file, then a rename), as Lightning writes its own."""
    from lightning_fabric.utilities.cloud_io import _atomic_save

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(checkpoint, path)


def saved_position(path: Path) -> dict[str, int]:
    """Where the checkpoint at ``path`` left its run (epoch, batches, global_step), read from the file itself:
    ``last.json`` is written after the checkpoint, so a run killed between the two holds a newer checkpoint than
    its ``last.json`` says. The file's tensors are memory-mapped, not read."""
    import torch

    return dict(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["crisp_position"])


def resumed_logger(path: Path) -> dict[str, Any]:
    """What a run's logger resumes from the checkpoint at ``path``: its step (from the file, see
    :func:`saved_position`) and its W&B run (from ``last.json``: the same at every save)."""
    return {"global_step": saved_position(path)["global_step"], "wandb_id": read_info(path.parent).get("wandb_id")}


def read_info(folder: Path) -> dict[str, Any]:
    """``last.json`` in a run's checkpoint folder: which run, where it was, its W&B run."""
    return results.read(Path(folder) / INFO) or {}


class RunCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO (a temp file, then a rename), then ``last.json`` beside the checkpoint."""

    def __init__(self, run_dir: Path, run_key: str):
        super().__init__()
        self.run_dir, self.run_key = Path(run_dir), run_key

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        write_info(self.run_dir, self.run_key, checkpoint["crisp_position"], checkpoint["crisp"].get("wandb_id"))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location, weights_only=False)  # crisp's own file


class ResumeCheckpoint(Checkpoint):
    """Saves the run's checkpoint every ``every_n_steps`` optimizer steps (and at every epoch's end), or every
    ``every_n_epochs`` epochs, to ``path`` (see the module). A Checkpoint for Lightning: its epoch-end save
    comes after the module's own epoch end (the epoch's history is in it)."""

    def __init__(self, path: Path, every_n_steps: int | None = None, every_n_epochs: int | None = None):
        self.path, self.every_n_steps, self.every_n_epochs = Path(path), every_n_steps, every_n_epochs
        self._saved_step = -1

    @property
    def state_key(self) -> str:
        return "crisp-resume"

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking or self._saved_step == trainer.global_step and self.every_n_steps:
            return
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not self.every_n_steps or trainer.global_step == 0 or trainer.global_step % self.every_n_steps:
            return
        if batch_idx + 1 >= trainer.num_training_batches or _validates_after(trainer, batch_idx):
            return  # the save after validation or at the epoch's end holds this point whole
        self._save(trainer)

    def on_train_epoch_end(self, trainer, module) -> None:
        if self.every_n_steps or (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer)


def _validates_after(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether Lightning validates after this training batch (its val_check_batch, every N epochs)."""
    every = trainer.val_check_batch
    epochs = trainer.check_val_every_n_epoch
    if not trainer.enable_validation or every is None or every == float("inf"):
        return False
    if epochs is not None and (trainer.current_epoch + 1) % epochs:
        return False
    return (batch_idx + 1) % int(every) == 0
