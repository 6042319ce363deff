"""What results.json records of a trained run: its history, final and best epochs, layers, timing, environment.

One shape for a run trained alone and a run of a lockstep group (:func:`run_outcome`); the run lifecycle
(:mod:`crisp.core.lifecycle`) adds the record every results.json starts with and writes it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import transformers

import crisp
from crisp.training.tasks import Task

REPO = Path(__file__).resolve().parents[2]


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


def run_outcome(task: Task, history: list[dict], configured: list[float], layers: dict[str, list[float]],
                calibration_entropy: list[float] | None, timing: dict[str, Any], accelerator: str,
                wandb_run: dict[str, Any] | None, resumed_from_step: int | None = None,
                stopped: dict[str, Any] | None = None, trained_model: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a completed run adds to its results.json (``timing`` as the caller measured it). ``resumed_from_step``:
    the optimizer step of the checkpoint it resumed from (None: it trained from the start); ``stopped``: where
    and why it stopped before its last epoch (early stopping), else None; ``trained_model``: the class and source
    of the model that trained (:func:`crisp.core.results.trained_model`)."""
    return {
        "trained_model": trained_model,
        "layers": layers_summary(configured, layers, calibration_entropy),
        **epochs_summary(history, task),
        "resumed_from_step": resumed_from_step,
        "stopped": stopped,
        "timing": timing,
        "environment": environment(accelerator),
        "wandb": wandb_run,
    }


def stopped_early(trainer: pl.Trainer, callbacks: list[pl.Callback], epochs: int, max_epochs: int) -> dict | None:
    """Where and why a run stopped before ``max_epochs`` epochs: an early-stopping callback, or
    ``trainer.max_steps``; None when it trained every epoch (or stopped for no reason it can name)."""
    from pytorch_lightning.callbacks import EarlyStopping

    if epochs >= max_epochs:
        return None
    for callback in callbacks:
        if isinstance(callback, EarlyStopping) and trainer.should_stop:
            return {"epoch": callback.stopped_epoch, "step": trainer.global_step,
                    "by": f"{type(callback).__name__}(monitor={callback.monitor})"}
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return {"epoch": trainer.current_epoch, "step": trainer.global_step, "by": "trainer.max_steps"}
    return None

