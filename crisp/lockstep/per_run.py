"""What a lockstep group applies to each of its runs as a run alone gets it from Lightning.

- :func:`clip_per_run`: gradient clipping by each run's own norm (a fused parameter's first dimension is
  the run), as ``torch.nn.utils.clip_grad_norm_`` clips one run's gradient alone; by value it is elementwise
  anyway.
- :class:`RunStopping`: each run's copies of the config's EarlyStopping callbacks, checked on that run's own
  metrics when Lightning's would check them (after each validation, or at the epoch's end when validation
  comes once an epoch); a run that stops leaves the group completed.
- :class:`RunLearningRates`: LearningRateMonitor's numbers for each run (its own schedule), to its own logger.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor

from crisp.training import callbacks as user_callbacks
from crisp.training.tasks import task_of


@torch.no_grad()
def clip_per_run(params: Sequence[torch.Tensor], value: float, algorithm: str = "norm") -> torch.Tensor | None:
    """Clip each run's gradient (its slice of every parameter's gradient) to ``value``; by norm, returns each
    run's norm before clipping (``[runs]``)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    if algorithm == "value":
        torch._foreach_clamp_min_(grads, -value)
        torch._foreach_clamp_max_(grads, value)
        return None
    norms = torch.stack([g.float().flatten(1).norm(2, dim=1) for g in grads]).norm(2, dim=0)
    coef = (value / (norms + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_: the same epsilon and clamp
    for g in grads:
        g.mul_(coef.to(g.dtype).view(-1, *([1] * (g.dim() - 1))))
    return norms


class RunStopping:
    """One run's copies of the group's EarlyStopping callbacks (see the module)."""

    def __init__(self, stoppers: Sequence[EarlyStopping]):
        self.stoppers = [copy.deepcopy(s) for s in stoppers]

    @staticmethod
    def _at_epoch_end(stopper: EarlyStopping, trainer) -> bool:
        """Whether it checks at the epoch's end (Lightning's rule: when validation comes once an epoch)."""
        if stopper._check_on_train_epoch_end is None:
            return trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
        return stopper._check_on_train_epoch_end

    def check(self, trainer, metrics: dict[str, float], epoch_end: bool) -> str | None:
        """Check the stoppers due now on this run's ``metrics``; why it stops, or None."""
        for stopper in self.stoppers:
            # a monitor the run does not log: Lightning's own error when strict (as the run alone), else skipped
            if self._at_epoch_end(stopper, trainer) != epoch_end or not stopper._validate_condition_metric(metrics):
                continue
            stop, reason = stopper._evaluate_stopping_criteria(torch.tensor(float(metrics[stopper.monitor])))
            if stop:
                stopper.stopped_epoch = trainer.current_epoch
                return f"{type(stopper).__name__}(monitor={stopper.monitor}): {reason}"
        return None

    def state_dict(self) -> list[dict[str, Any]]:
        return [s.state_dict() for s in self.stoppers]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for stopper, state in zip(self.stoppers, states, strict=True):
            stopper.load_state_dict(state)


class RunLearningRates:
    """The learning rate of each run at each optimizer step (or epoch), named as LearningRateMonitor names
    AdamW's two parameter groups (``lr-AdamW/pg1``, ``lr-AdamW/pg2``)."""

    def __init__(self, monitor: LearningRateMonitor):
        self.interval = monitor.logging_interval or "step"

    def metrics(self, lr: float) -> dict[str, float]:
        return {"lr-AdamW/pg1": lr, "lr-AdamW/pg2": lr}


def per_run_callbacks(cfg: DictConfig, output_dir) -> tuple[list[EarlyStopping], RunLearningRates | None]:
    """The config's callbacks as a group applies them per run: its early stoppings (each run gets copies) and
    its learning-rate monitor; any other callback cannot run per run (crisp.training.callbacks.not_in_lockstep)."""
    built = user_callbacks.build(cfg, task_of(cfg.data), output_dir)
    stoppers = [c for c in built if type(c) is EarlyStopping]
    monitors = [c for c in built if type(c) is LearningRateMonitor]
    return stoppers, RunLearningRates(monitors[0]) if monitors else None
