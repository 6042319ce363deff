"""The ``callbacks`` group: Lightning callbacks a user picks, each instantiated by Hydra from its ``_target_``.

``callbacks=early_stopping`` (or ``[early_stopping,lr_monitor]``, or ``+callbacks.mine._target_=pkg.Class``)
adds them to the run's Trainer. Two words are crisp's: ``monitor: primary`` is the task's primary metric
as it is logged (``val/acc``, ``val/mcc``, ...), and a ModelCheckpoint without ``dirpath`` keeps its files in
the run's ``checkpoints/``.

A lockstep group trains many runs as one Lightning module, so a callback there sees the group, not a run.
Early stopping and learning-rate monitoring are applied to each run by the group itself
(:mod:`crisp.lockstep.per_run`); any other callback cannot run per run, and :func:`not_in_lockstep` names it
so that its jobs train one process per run (or a forced lockstep stops before training).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from crisp.core.errors import ConfigError
from crisp.training.tasks import Task

PRIMARY = "primary"
# the callbacks a lockstep group applies to each of its runs (crisp.lockstep.per_run)
PER_RUN = (EarlyStopping, LearningRateMonitor)
# the LearningRateMonitor settings a group applies per run (crisp.lockstep.per_run.RunLearningRates)
LR_MONITOR_IN_LOCKSTEP = {"logging_interval": (None, "step"), "log_momentum": (None, False),
                          "log_weight_decay": (None, False)}


def logged_name(metric: str) -> str:
    """A results key as the run logs it: ``val_acc`` -> ``val/acc``."""
    return "val/" + metric.removeprefix("val_") if metric.startswith("val_") else metric


def _entries(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    callbacks = cfg.get("callbacks")
    return OmegaConf.to_container(callbacks, resolve=True) if callbacks else {}


def _class(name: str, target: str) -> type:
    try:
        cls = get_class(target)
    except Exception as err:  # Hydra wraps ImportError and AttributeError alike
        raise ConfigError(f"callbacks.{name}._target_={target!r} is not allowed: it cannot be imported "
                          f"({str(err).splitlines()[0]})") from None
    if not (isinstance(cls, type) and issubclass(cls, pl.Callback)):
        raise ConfigError(f"callbacks.{name}._target_={target!r} is not allowed: it is not a "
                          "pytorch_lightning.Callback")
    return cls


def build(cfg: DictConfig, task: Task, output_dir: Path) -> list[pl.Callback]:
    """The config's callbacks, each instantiated from its ``_target_`` (see the module for crisp's two words)."""
    built = []
    for name, entry in _entries(cfg).items():
        cls = _class(name, entry["_target_"])
        entry = copy.deepcopy(entry)
        if entry.get("monitor") == PRIMARY:
            entry["monitor"] = logged_name(task.primary)
            entry.setdefault("mode", "max")  # every task's primary metric is better higher
        if issubclass(cls, ModelCheckpoint) and not entry.get("dirpath"):
            entry["dirpath"] = str(Path(output_dir) / "checkpoints")
        try:
            built.append(instantiate(entry, _convert_="all"))
        except Exception as err:
            cause = err.__cause__ or err
            raise ConfigError(f"callbacks.{name} ({entry['_target_']}) is not allowed: "
                              f"{type(cause).__name__}: {str(cause).splitlines()[0]}") from None
    return built


def not_in_lockstep(cfg: DictConfig) -> list[str]:
    """The callbacks a fused lockstep group cannot apply to each run (see the module)."""
    blocked = []
    for name, entry in _entries(cfg).items():
        cls = _class(name, entry["_target_"])
        if cls not in PER_RUN:  # a subclass may change what it does: it runs alone
            blocked.append(f"callbacks.{name} ({cls.__name__})")
        elif cls is LearningRateMonitor:  # a group logs each run's learning rate at each step, and nothing else
            blocked += [f"callbacks.{name}.{key}={entry[key]}" for key, per_run in LR_MONITOR_IN_LOCKSTEP.items()
                        if entry.get(key) not in per_run]
    return blocked
