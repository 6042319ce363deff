"""The LightningModule of a lockstep group: R runs' training steps as one step of a fused model.

Per run it keeps what :class:`crisp.training.classifier.SparseClassifier` keeps for one: the training
loss (and accuracy, for classification) of each epoch, the task's validation metrics on each of its
validation splits, per-layer achieved sparsity and attention entropy, its per-epoch history, and its
own logger. The loss of the step is the sum of the runs' mean losses, so each run's gradient is
exactly its own. Each run keeps its own learning rate, weight decay and warm-up
(:class:`crisp.lockstep.run_adamw.RunAdamW`) and its own dropout probabilities (its model's, fused
by :func:`crisp.lockstep.fused.fuse`). A run whose training loss is not finite at the end of an
epoch fails (as it would alone) and leaves the group: its slices of the parameters and optimizer
state are dropped, and the next epoch trains the others only. A run that early stopping stops
(:class:`crisp.lockstep.per_run.RunStopping`) leaves the same way, completed with its history so far.

Lightning's trainer options apply per run: accumulation (each run's loss is its own), clipping by each
run's own gradient norm (:func:`crisp.lockstep.per_run.clip_per_run`), the validation interval (each run's
logger gets every validation). A checkpoint holds each run's part (:meth:`on_save_checkpoint`; written
per run by :class:`crisp.lockstep.checkpoints.GroupCheckpointIO`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from crisp.core import heartbeat
from crisp.lockstep.batches import GroupDataModule
from crisp.lockstep.dropout import RunRandom
from crisp.lockstep.fused import follow_weight_decay, keep_runs, sentences_start_at, solo_ndim
from crisp.lockstep.packing import attention_mask
from crisp.lockstep.per_run import RunLearningRates, RunStopping, clip_per_run
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
from crisp.training.trainer import manual_settings, stepping_batches


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
    stopping: RunStopping | None = None  # its own early stopping, if the config has any
    stopped: dict[str, Any] | None = None  # where and why early stopping stopped it
    output_dir: Path | None = None  # where its checkpoint goes
    run_key: str | None = None
    wandb_id: str | None = None


class LockstepClassifier(pl.LightningModule):
    def __init__(self, encoder: torch.nn.Module, runs: list[FusedRun], random: RunRandom, cfg: DictConfig,
                 task: tasks.Task, cuda_graphs: bool = False, on_failure: Callable[[FusedRun], None] | None = None,
                 on_stop: Callable[[FusedRun, int], None] | None = None,
                 learning_rates: RunLearningRates | None = None):
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
        self.on_stop = on_stop  # (run, its position now): a run that early stopping stopped completes
        self.learning_rates = learning_rates
        self.manual = manual_settings(cfg)  # accumulation and clipping, applied here in manual optimization
        self.stepping = True
        self.resumed_from_step: int | None = None
        self._resumed: dict | None = None
        self._val: list[dict] = [{} for _ in runs]
        self._val_layers: list[dict] = [{} for _ in runs]
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
        if self.stepping and self.global_step % self.log_every == 0 and any(run.logger for run in self.runs):
            lrs = self._run_lrs() if self.learning_rates and self.learning_rates.interval == "step" else None
            for i, (run, loss) in enumerate(zip(self.runs, losses.detach().tolist(), strict=True)):
                if run.logger:
                    extra = {} if lrs is None else self.learning_rates.metrics(lrs[i])
                    run.logger.log_metrics({"train/loss": loss, **extra}, step=self.global_step)
        heartbeat.beat()
        return total

    def _run_lrs(self) -> list[float]:
        """Each run's learning rate for the coming optimizer step (its slice's schedule)."""
        optimizer: RunAdamW = self.optimizers().optimizer
        lrs = optimizer.lrs()
        return [next(lr for s, lr in zip(optimizer.slices, lrs, strict=True) if s.start <= i < s.stop)
                for i in range(len(self.runs))]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, by each run's own gradient norm (automatic optimization)."""
        if gradient_clip_val:
            clip_per_run(list(self.encoder.parameters()), float(gradient_clip_val),
                         str(gradient_clip_algorithm or "norm").lower())

    def _graphed_training_step(self, batch, track: bool, step_now: bool):
        if self.graphed_step is None:
            # a shape is captured at its fourth step: an epoch's short last batch never is
            self.graphed_step = GraphedTrainStep(self._loss_and_logits, list(self.encoder.parameters()), warmup=3)
        clip = None
        if self.manual["clip_val"]:
            def clip():
                clip_per_run(self.graphed_step.params, float(self.manual["clip_val"]), self.manual["clip_algorithm"])
        outputs, _ = self.graphed_step.optimizer_step(self, batch, track, accumulate=self.manual["accumulate"],
                                                      step_now=step_now, clip=clip)
        return outputs

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
        if self.trainer.sanity_checking:
            return
        for i, run in enumerate(self.runs):  # every validation, as a run alone logs it
            if run.logger:
                run.logger.log_metrics(self._val_metrics(i), step=self.global_step)
        self._check_stopping(epoch_end=False)

    def _val_metrics(self, i: int) -> dict[str, float]:
        return {**{f"val/{k.removeprefix('val_')}": v for k, v in self._val[i].items()}, **self._val_layers[i]}

    def _check_stopping(self, epoch_end: bool, train: list[dict] | None = None) -> None:
        """Each run's early stopping on its own metrics; the runs it stops complete and leave the group."""
        stopped = []
        for i, run in enumerate(self.runs):
            if run.stopping is None or run.error is not None or run.stopped is not None:
                continue
            metrics = {**self._val_metrics(i), **(train[i] if train else {})}
            reason = run.stopping.check(self.trainer, metrics, epoch_end)
            if reason is not None:
                run.stopped = {"epoch": self.current_epoch, "step": self.global_step, "by": reason}
                stopped.append(i)
        for i in stopped:
            print(f"{self.runs[i].name}: stopped early in epoch {self.current_epoch} ({self.runs[i].stopped['by']})",
                  flush=True)
            if not epoch_end:  # as Lightning ends an epoch that early stopping cut short: what it trained so far
                self.runs[i].history.append(self._partial_epoch(i))
            if self.on_stop is not None:
                self.on_stop(self.runs[i], i)
        if stopped and epoch_end:
            self._leave(stopped)  # else it leaves at the epoch's end: a group's batches are fixed for an epoch

    def _partial_epoch(self, i: int) -> dict:
        """Run ``i``'s record of the epoch so far (its training loss and accuracy over the batches trained)."""
        loss, correct, steps, seen = (self._sums.get(k) for k in ("train_loss", "train_correct", "train_steps",
                                                                     "train_seen"))
        acc = None if correct is None else float(correct[i] / seen)
        return epoch_record(self.current_epoch, float(loss[i] / steps), acc, self._val[i])

    def on_train_epoch_end(self) -> None:
        loss, correct, steps, seen, stats, tracked = self._take(
            "train_loss", "train_correct", "train_steps", "train_seen", "train_stats", "train_tracked")
        losses = (loss / steps).tolist()
        accs = [None] * len(self.runs) if correct is None else (correct / seen).tolist()
        layers = self._layer_metrics("train", stats, tracked)
        failed, train = [], []
        for i, run in enumerate(self.runs):
            record = epoch_record(self.current_epoch, losses[i], accs[i], self._val[i])
            if run.stopped is None:  # (one stopped mid-epoch has its record)
                run.history.append(record)
            train.append({"train/epoch_loss": losses[i], **({} if accs[i] is None else {"train/acc": accs[i]}),
                          **layers[i]})
            if run.logger:
                run.logger.log_metrics(train[i], step=self.global_step)
            print(f"epoch {self.current_epoch} {run.name}: "
                  + " ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"), flush=True)
            if not math.isfinite(losses[i]) and run.stopped is None:
                run.error = FloatingPointError(f"the training loss became {losses[i]} in epoch {self.current_epoch}")
                failed.append(i)
        # runs that failed, and runs that stopped mid-epoch, leave now
        leaving = failed + [i for i, run in enumerate(self.runs) if run.stopped is not None]
        for i in failed:
            if self.on_failure is not None:
                self.on_failure(self.runs[i])
        if leaving:
            self._leave(leaving)
            train = [t for i, t in enumerate(train) if i not in leaving]
        self._check_stopping(epoch_end=True, train=train)

    def _leave(self, leaving: list[int]) -> None:
        """These runs leave the group: the fused model, optimizer, data and streams keep the others."""
        keep = [i for i in range(len(self.runs)) if i not in leaving]
        if not keep:
            self.trainer.should_stop = True
            return
        self._val = [self._val[i] for i in keep]
        self._val_layers = [self._val_layers[i] for i in keep]
        optimizer = self.optimizers().optimizer
        keep_runs(self.encoder, keep, optimizer)
        optimizer.keep_runs(keep)
        self.random.keep_runs(keep)
        datamodule: GroupDataModule = self.trainer.datamodule
        datamodule.keep_runs(keep)
        self.runs[:] = [self.runs[i] for i in keep]
        self._set_sparsity()
        self.graphed_step = None  # its graphs hold the old shapes

    # -- resuming -------------------------------------------------------------------------------
    PER_RUN_SUMS = ("train_loss", "train_correct", "train_stats")  # [runs, ...]; the others are the group's

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Each run's part (``crisp_runs``: its history, layers, the epoch's sums so far, early stopping) and the
        group's (its dropout streams' step, the sums every run shares); the group's IO writes a file per run."""
        from crisp.training.checkpoints import position

        for run in self.runs:  # each run's metrics so far on disk with the checkpoint (its CSV writer buffers them)
            if run.logger:
                run.logger.save()
        checkpoint["crisp_runs"] = [{
            "name": run.name, "run_key": run.run_key, "wandb_id": run.wandb_id, "history": run.history,
            "layers": run.layers, "stopping": None if run.stopping is None else run.stopping.state_dict(),
            "sums": {k: v[i].detach().cpu() for k, v in self._sums.items() if k in self.PER_RUN_SUMS},
        } for i, run in enumerate(self.runs)]
        checkpoint["crisp_group"] = {
            "random_step": int(self.random.step), "runs": len(self.runs),
            "sums": {k: v.detach().cpu() for k, v in self._sums.items() if k not in self.PER_RUN_SUMS}}
        checkpoint["crisp_position"] = position(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for run, saved in zip(self.runs, checkpoint["crisp_runs"], strict=True):
            run.history, run.layers = saved["history"], saved["layers"]
            if run.stopping is not None and saved["stopping"] is not None:
                run.stopping.load_state_dict(saved["stopping"])
        self._resumed = checkpoint
        self.resumed_from_step = checkpoint["global_step"]

    def on_train_start(self) -> None:
        """A resumed group's running sums and dropout streams' step, once training starts."""
        saved, self._resumed = self._resumed, None
        if saved is None:
            return
        device = self.random.step.device
        self.random.step.fill_(saved["crisp_group"]["random_step"])
        self._sums = {k: v.to(device) for k, v in saved["crisp_group"]["sums"].items()}
        for key in self.PER_RUN_SUMS:
            if key in saved["crisp_runs"][0]["sums"]:
                self._sums[key] = torch.stack([r["sums"][key] for r in saved["crisp_runs"]]).to(device)

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        params = list(self.encoder.parameters())
        # as for one run: biases and LayerNorm weights (1-D in a run's own model) are not decayed;
        # each run's schedule is the optimizer's own, so there is no Lightning scheduler
        optimizer = RunAdamW([p for p in params if solo_ndim(p) >= 2], [p for p in params if solo_ndim(p) < 2],
                             [run.optim for run in self.runs], stepping_batches(self, self.manual["accumulate"]),
                             betas=self.optim.betas, eps=self.optim.eps,
                             fused=fused_adamw(self.optim, self.encoder))
        follow_weight_decay(self.encoder, optimizer)
        self.encoder.crisp_weight_copies.follow(optimizer)
        return optimizer
