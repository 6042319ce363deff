"""The LightningModule of a lockstep group: R runs' training steps as one step of a fused model.

Per run it keeps what :class:`crisp.training.classifier.SparseClassifier` keeps for one: the training
loss (and accuracy, for classification) of each epoch, the task's validation metrics on each of its
validation splits, per-layer achieved sparsity and attention entropy, its per-epoch history, and its
own logger. The loss of the step is the sum of the runs' mean losses, so each run's gradient is
exactly its own. Each run keeps its own learning rate, weight decay and warm-up
(:class:`crisp.lockstep.run_adamw.RunAdamW`) and its own dropout probabilities (its model's, fused
by :func:`crisp.lockstep.fused.fuse`). A run whose training loss is not finite at the end of an
epoch fails (as it would alone) and leaves the group: its slices of the parameters and optimizer
state are dropped, and the next epoch trains the others only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from crisp.core import heartbeat
from crisp.lockstep.batches import GroupDataModule
from crisp.lockstep.dropout import RunRandom
from crisp.lockstep.fused import follow_weight_decay, keep_runs, sentences_start_at, solo_ndim
from crisp.lockstep.packing import attention_mask
from crisp.lockstep.run_adamw import RunAdamW, RunOptim
from crisp.sparsity.attention import RunRows, batch_of_runs
from crisp.sparsity.families import attention_modules, family_of
from crisp.sparsity.streams import TokenPlaces, random_stream
from crisp.training import tasks
from crisp.training.classifier import (
    ValidationOutputs,
    epoch_record,
    fused_adamw,
    layer_metrics,
    track,
    training_outputs,
)
from crisp.training.cuda_graphs import GraphedTrainStep


@dataclass
class FusedRun:
    """One run of the group as the module sees it."""

    name: str
    layer_sparsity: list[float]
    optim: RunOptim
    sparsifier_params: dict[str, float] = field(default_factory=dict)  # its own keys (entmax's alpha)
    logger: Any = None  # a Lightning logger of its own, or None
    history: list[dict] = field(default_factory=list)
    layers: dict[str, list[float]] = field(default_factory=dict)
    error: BaseException | None = None


class LockstepClassifier(pl.LightningModule):
    def __init__(self, encoder: torch.nn.Module, runs: list[FusedRun], random: RunRandom, cfg: DictConfig,
                 task: tasks.Task, cuda_graphs: bool = False, on_failure: Callable[[FusedRun], None] | None = None):
        super().__init__()
        self.encoder = encoder.train()
        self.runs = runs  # the active ones, in the fused model's order
        self.automatic_optimization = not cuda_graphs
        self.graphed_step: GraphedTrainStep | None = None
        self.random = random
        self.task = task
        self.optim = cfg.optim
        self.stats_every = max(1, cfg.sparsifier.stats_every_n_steps)
        self.log_every = max(1, cfg.trainer.log_every_n_steps)
        self.on_failure = on_failure
        self.attention = attention_modules(encoder)
        self.first_position = family_of(encoder).first_position(encoder)
        self._set_sparsity()
        self.val = ValidationOutputs(len(task.validation))
        self._sums: dict[str, torch.Tensor] = {}

    # -- bookkeeping ------------------------------------------------------------------------------
    def _set_sparsity(self) -> None:
        """Each layer's sparsity and the sparsifier's own keys: one value per run, in the runs' order."""
        keys = self.runs[0].sparsifier_params
        for layer, module in enumerate(self.attention):
            module.crisp_sparsity = tuple(run.layer_sparsity[layer] for run in self.runs)
            if keys:
                module.crisp_sparsifier_params = {k: tuple(run.sparsifier_params[k] for run in self.runs) for k in keys}

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._sums[name] = value if name not in self._sums else self._sums[name] + value

    def _take(self, *names: str) -> list[torch.Tensor | None]:
        return [self._sums.pop(name, None) for name in names]

    def _track(self, enabled: bool) -> None:
        track(self.attention, enabled)

    def _layer_stats(self) -> torch.Tensor:
        return torch.stack([m.crisp_stats for m in self.attention], dim=1)  # [runs, layers, 2]

    # -- steps ------------------------------------------------------------------------------------
    def _loss_and_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        training = self.encoder.training
        if training:
            self.random.next_step()
        segments = batch["segments"]
        runs = RunRows(len(self.runs), query_valid=segments >= 0, dropout=self.random.dropout if training else None)
        extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        positions = batch["position_ids"] + self.first_position if self.first_position else batch["position_ids"]
        places = TokenPlaces(batch["examples"], batch["position_ids"])  # where each run's draws find a token
        with batch_of_runs(runs), sentences_start_at(batch["first"]), random_stream(self.random, places):
            logits = self.encoder(input_ids=batch["input_ids"], attention_mask=attention_mask(segments),
                                  position_ids=positions, **extra).logits
        losses = tasks.loss(self.task, logits, batch["labels"], reduction="none").view(len(self.runs), -1).mean(1)
        return losses.sum(), losses, logits

    def training_step(self, batch, batch_idx):
        tracked, (total, losses, logits) = training_outputs(self, batch, batch_idx)
        runs = len(self.runs)
        self._add("train_loss", losses.detach())
        if not self.task.regression:
            self._add("train_correct", (logits.detach().argmax(-1) == batch["labels"]).view(runs, -1).sum(1))
        self._add("train_steps", torch.ones((), device=losses.device))
        self._add("train_seen", torch.full((), batch["labels"].numel() // runs, device=losses.device))
        if tracked:
            self._add("train_stats", self._layer_stats())
            self._add("train_tracked", torch.ones((), device=losses.device))
        if self.global_step % self.log_every == 0 and any(run.logger for run in self.runs):
            for run, loss in zip(self.runs, losses.detach().tolist(), strict=True):
                if run.logger:
                    run.logger.log_metrics({"train/loss": loss}, step=self.global_step)
        heartbeat.beat()
        return total

    def _graphed_training_step(self, batch, track: bool):
        if self.graphed_step is None:
            # a shape is captured at its fourth step: an epoch's short last batch never is
            self.graphed_step = GraphedTrainStep(self._loss_and_logits, list(self.encoder.parameters()), warmup=3)
        return self.graphed_step.optimizer_step(self, batch, track)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._track(True)
        _, losses, logits = self._loss_and_logits(batch)
        runs = len(self.runs)
        count = batch["labels"].numel() // runs
        preds = tasks.predictions(self.task, logits).view(runs, -1).T  # [examples, runs]
        self.val.update(dataloader_idx, preds, batch["labels"].view(runs, -1).T, losses * count)
        if dataloader_idx == 0:
            self._add("val_stats", self._layer_stats())
            self._add("val_tracked", torch.ones((), device=losses.device))
        heartbeat.beat()

    # -- epochs -----------------------------------------------------------------------------------
    def _layer_metrics(self, stage: str, stats: torch.Tensor | None, tracked: torch.Tensor | None) -> list[dict]:
        if stats is None:
            return [{} for _ in self.runs]
        metrics = []
        for run, layers in zip(self.runs, (stats / tracked).tolist(), strict=True):
            run.layers[f"{stage}_achieved"] = [a for a, _ in layers]
            run.layers[f"{stage}_entropy"] = [h for _, h in layers]
            metrics.append(layer_metrics(stage, layers))
        return metrics

    def on_validation_epoch_end(self) -> None:
        stats, tracked = self._take("val_stats", "val_tracked")
        self._val = [self.val.compute(self.task, column) for column in range(len(self.runs))]
        self.val = ValidationOutputs(len(self.task.validation))
        self._val_layers = self._layer_metrics("val", stats, tracked)

    def on_train_epoch_end(self) -> None:
        loss, correct, steps, seen, stats, tracked = self._take(
            "train_loss", "train_correct", "train_steps", "train_seen", "train_stats", "train_tracked")
        losses = (loss / steps).tolist()
        accs = [None] * len(self.runs) if correct is None else (correct / seen).tolist()
        layers = self._layer_metrics("train", stats, tracked)
        failed = []
        for i, run in enumerate(self.runs):
            record = epoch_record(self.current_epoch, losses[i], accs[i], self._val[i])
            run.history.append(record)
            if run.logger:
                metrics = {"train/epoch_loss": losses[i], **({} if accs[i] is None else {"train/acc": accs[i]}),
                           **layers[i], **{f"val/{k.removeprefix('val_')}": v for k, v in self._val[i].items()},
                           **self._val_layers[i]}
                run.logger.log_metrics(metrics, step=self.global_step)
            print(f"epoch {self.current_epoch} {run.name}: "
                  + " ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"), flush=True)
            if not math.isfinite(losses[i]):
                run.error = FloatingPointError(f"the training loss became {losses[i]} in epoch {self.current_epoch}")
                failed.append(i)
        if failed:
            self._leave(failed)

    def _leave(self, failed: list[int]) -> None:
        """The failed runs leave the group: the fused model, optimizer, data and streams keep the others."""
        for i in failed:
            if self.on_failure is not None:
                self.on_failure(self.runs[i])
        keep = [i for i in range(len(self.runs)) if i not in failed]
        if not keep:
            self.trainer.should_stop = True
            return
        optimizer = self.optimizers().optimizer
        keep_runs(self.encoder, keep, optimizer)
        optimizer.keep_runs(keep)
        self.random.keep_runs(keep)
        datamodule: GroupDataModule = self.trainer.datamodule
        datamodule.keep_runs(keep)
        self.runs[:] = [self.runs[i] for i in keep]
        self._set_sparsity()
        self.graphed_step = None  # its graphs hold the old shapes

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        params = list(self.encoder.parameters())
        # as for one run: biases and LayerNorm weights (1-D in a run's own model) are not decayed;
        # each run's schedule is the optimizer's own, so there is no Lightning scheduler
        optimizer = RunAdamW([p for p in params if solo_ndim(p) >= 2], [p for p in params if solo_ndim(p) < 2],
                             [run.optim for run in self.runs], self.trainer.estimated_stepping_batches,
                             betas=self.optim.betas, eps=self.optim.eps,
                             fused=fused_adamw(self.optim, self.encoder))
        follow_weight_decay(self.encoder, optimizer)
        self.encoder.crisp_weight_copies.follow(optimizer)
        return optimizer
