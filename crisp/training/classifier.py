"""The LightningModule of one run: a sequence classifier (or regressor) whose attention crisp sparsifies."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torchmetrics import MeanMetric
from transformers import get_linear_schedule_with_warmup

import crisp
from crisp.sparsity.calibration import MODEL_INPUTS
from crisp.sparsity.families import attention_modules
from crisp.sparsity.streams import RunStreams, random_stream
from crisp.training import tasks
from crisp.training.cuda_graphs import GraphedTrainStep
from crisp.training.trainer import manual_settings, stepping_batches


class LayerStatsMeter:
    """Mean of per-layer [achieved sparsity, entropy] over the batches that tracked them, kept on the device."""

    def __init__(self):
        self.total, self.count = None, 0

    def state(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load(self, state: dict, device: torch.device) -> None:
        self.total = None if state["total"] is None else state["total"].to(device)
        self.count = state["count"]

    def update(self, stats: torch.Tensor) -> None:
        self.total = stats if self.total is None else self.total + stats
        self.count += 1

    def compute(self) -> list | None:
        if self.total is None:
            return None
        values = (self.total / self.count).tolist()
        self.total, self.count = None, 0
        return values


class ValidationOutputs:
    """A validation epoch's predictions, labels and summed loss per split, kept on the device until its end.

    The task's metrics are computed from all of a split's predictions at once (:func:`crisp.training.tasks.metrics`):
    Matthews correlation and Pearson's r do not average over batches. A lockstep group keeps one column per run.
    """

    def __init__(self, splits: int):
        self.preds: list[list[torch.Tensor]] = [[] for _ in range(splits)]
        self.target: list[list[torch.Tensor]] = [[] for _ in range(splits)]
        self.loss: list[torch.Tensor | float] = [0.0] * splits
        self.seen = [0] * splits

    def update(self, split: int, preds: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor) -> None:
        self.preds[split].append(preds)
        self.target[split].append(target)
        self.loss[split] = self.loss[split] + loss_sum
        self.seen[split] += len(target)

    def compute(self, task: tasks.Task, column: int | None = None) -> dict[str, float]:
        """Every recorded metric of every split (of one run's ``column`` in a lockstep group)."""
        values = {}
        for split, suffix in enumerate(task.splits):
            preds, target = torch.cat(self.preds[split]), torch.cat(self.target[split])
            loss = self.loss[split] / self.seen[split]
            if column is not None:
                preds, target, loss = preds[:, column], target[:, column], loss[column]
            values[f"val_loss{suffix}"] = float(loss)
            values |= tasks.metrics(task, preds, target, suffix)
        return values


def epoch_record(epoch: int, train_loss: float, train_acc: float | None, val: dict[str, float]) -> dict:
    """One epoch of a run's history (training accuracy only for classification)."""
    record = {"epoch": epoch, "train_loss": train_loss}
    if train_acc is not None:
        record["train_acc"] = train_acc
    return record | val


def layer_metrics(stage: str, layers: list) -> dict[str, float]:
    """Per-layer achieved sparsity and entropy as logged: ``layers/<i>/<stage>_achieved_sparsity``, ..."""
    return {f"layers/{i}/{stage}_{name}": value for i, (achieved, entropy) in enumerate(layers)
            for name, value in (("achieved_sparsity", achieved), ("entropy", entropy))}


def track(attention: list[torch.nn.Module], enabled: bool) -> None:
    """Whether the next forward records each layer's statistics (a host-free switch, set per step)."""
    for module in attention:
        module.crisp_track_stats = enabled


def step_due(module: pl.LightningModule, batch_idx: int, accumulate: int) -> bool:
    """Whether the optimizer steps after this training batch: Lightning's rule for accumulation (every
    ``accumulate`` batches, and at the epoch's last batch)."""
    trainer = module.trainer
    return ((batch_idx + 1) % accumulate == 0 or batch_idx + 1 >= trainer.num_training_batches
            or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def training_outputs(module, batch: dict[str, torch.Tensor], batch_idx: int) -> tuple[bool, tuple]:
    """A training step's outputs (loss first) and whether it recorded statistics (every N-th step): through
    the module's CUDA-graphed step in manual optimization, else eagerly for Lightning's own. Sets
    ``module.stepping``: whether the optimizer steps after this batch (accumulation)."""
    track_now = batch_idx % module.stats_every == 0
    track(module.attention, track_now)
    module.stepping = step_due(module, batch_idx, module.manual["accumulate"])
    if module.automatic_optimization:
        return track_now, module._loss_and_logits(batch)
    return track_now, module._graphed_training_step(batch, track_now, module.stepping)


def fused_adamw(optim, encoder: torch.nn.Module) -> bool:
    """``optim.fused``: auto is torch's fused kernel on CUDA, its default implementation elsewhere."""
    return next(encoder.parameters()).is_cuda if optim.fused == "auto" else bool(optim.fused)


def adamw(encoder: torch.nn.Module, optim, decayed: list, not_decayed: list) -> torch.optim.AdamW:
    """AdamW as Hugging Face fine-tunes (no decay for biases and LayerNorm weights); fused on CUDA."""
    groups = [{"params": decayed, "weight_decay": optim.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             fused=fused_adamw(optim, encoder) or None)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_ratio: float, total: int) -> dict:
    scheduler = get_linear_schedule_with_warmup(optimizer, round(warmup_ratio * total), total)
    return {"scheduler": scheduler, "interval": "step"}


class SparseClassifier(pl.LightningModule):
    """Fine-tunes ``encoder`` on ``task`` with its loss and AdamW. With ``cuda_graphs`` each training
    step's forward and backward replay a CUDA graph (crisp/training/cuda_graphs.py) and the optimizer
    steps manually."""

    def __init__(self, encoder: torch.nn.Module, cfg: DictConfig, task: tasks.Task, cuda_graphs: bool = False,
                 layer_sparsity: list[float] | None = None):
        super().__init__()
        self.automatic_optimization = not cuda_graphs
        self.graphed_step: GraphedTrainStep | None = None
        self.manual = manual_settings(cfg)  # accumulation and clipping, applied here in manual optimization
        self.stepping = True
        # from_pretrained returns eval mode, and Lightning keeps submodules' modes: dropout must be on
        self.encoder = encoder.train()
        self.task = task
        self.optim = cfg.optim
        self.stats_every = max(1, cfg.sparsifier.stats_every_n_steps)
        self.attention = attention_modules(encoder)
        # the run's own random stream, for a sparsifier that draws (random): by its seed, advanced per step
        self.seed = cfg.seed
        self.streams = RunStreams([cfg.seed], next(encoder.parameters()).device)
        # no input checks: they would wait for the GPU on every step; a NaN loss is caught per epoch
        self.train_loss, self.train_correct = MeanMetric(nan_strategy="disable"), MeanMetric(nan_strategy="disable")
        self.train_stats, self.val_stats = LayerStatsMeter(), LayerStatsMeter()
        self.val = ValidationOutputs(len(task.validation))
        # the strategy's allocation (crisp.training.builder sets it on the encoder before the run trains)
        self.layer_sparsity: list[float] = list(layer_sparsity) if layer_sparsity is not None \
            else crisp.get_sparsity(encoder)
        self.history: list[dict] = []
        self.last_val: dict = {}
        self.last_layers: dict = {}
        self.resume_info: dict = {}  # saved with a checkpoint (the run_key, its W&B run)
        self.resumed_from_step: int | None = None

    def on_fit_start(self) -> None:
        self.streams = RunStreams([self.seed], self.device)  # where Lightning put the model (a DDP rank's GPU)

    # -- statistics -----------------------------------------------------------------------------
    def _track(self, enabled: bool) -> None:
        track(self.attention, enabled)

    def _layer_stats(self) -> torch.Tensor:
        return torch.stack([m.crisp_stats for m in self.attention])

    # -- steps ----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with random_stream(self.streams):
            return self.encoder(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits

    def _loss_and_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder.training:
            self.streams.next_step()  # inside the step a CUDA graph captures: its replays advance it too
        logits = self(batch)
        return tasks.loss(self.task, logits, batch["labels"]), logits

    def _graphed_training_step(self, batch: dict[str, torch.Tensor], track: bool, step_now: bool):
        if self.graphed_step is None:
            self.graphed_step = GraphedTrainStep(self._loss_and_logits, list(self.encoder.parameters()))
        # a graph bakes in whether statistics are recorded and every layer's sparsity
        key = (track, tuple(getattr(m, "crisp_sparsity", 0.0) for m in self.attention))
        clip = None
        if self.manual["clip_val"]:
            def clip():
                self.clip_gradients(self.optimizers(), self.manual["clip_val"], self.manual["clip_algorithm"])
        outputs, _ = self.graphed_step.optimizer_step(self, batch, key, accumulate=self.manual["accumulate"],
                                                      step_now=step_now, clip=clip)
        return outputs

    def training_step(self, batch, batch_idx):
        tracked, (loss, logits) = training_outputs(self, batch, batch_idx)
        if tracked:
            self.train_stats.update(self._layer_stats())
        # metrics accumulate on the device: no host synchronisation in the hot loop
        self.train_loss.update(loss.detach())
        if not self.task.regression:
            self.train_correct.update((logits.detach().argmax(-1) == batch["labels"]).float())
        if self.automatic_optimization or self.stepping:  # (Lightning gates its own by accumulation)
            self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._track(True)
        logits = self(batch)
        loss = tasks.loss(self.task, logits, batch["labels"], reduction="sum")
        if dataloader_idx == 0:
            self.val_stats.update(self._layer_stats())
        self.val.update(dataloader_idx, tasks.predictions(self.task, logits), batch["labels"], loss)

    def _layer_metrics(self, stage: str, meter: LayerStatsMeter) -> dict[str, float]:
        """Per-layer achieved sparsity and entropy of this epoch: kept for results.json and logged."""
        layers = meter.compute()
        if layers is None:
            return {}
        self.last_layers[f"{stage}_achieved"] = [a for a, _ in layers]
        self.last_layers[f"{stage}_entropy"] = [h for _, h in layers]
        return layer_metrics(stage, layers)

    def on_validation_epoch_end(self) -> None:
        self.last_val = self.val.compute(self.task)
        self.val = ValidationOutputs(len(self.task.validation))
        metrics = {f"val/{k.removeprefix('val_')}": v for k, v in self.last_val.items()}
        metrics |= self._layer_metrics("val", self.val_stats)
        if not self.trainer.sanity_checking:
            self.log_dict(metrics, prog_bar=False, sync_dist=True)  # DDP: one value for all ranks

    def on_train_epoch_end(self) -> None:
        train_loss = self.train_loss.compute().item()
        train_acc = None if self.task.regression else self.train_correct.compute().item()
        self.train_loss.reset()
        self.train_correct.reset()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"the training loss became {train_loss} in epoch {self.current_epoch}")
        record = epoch_record(self.current_epoch, train_loss, train_acc, self.last_val)
        metrics = {"train/epoch_loss": train_loss} | ({} if train_acc is None else {"train/acc": train_acc})
        self.log_dict(metrics | self._layer_metrics("train", self.train_stats), sync_dist=True)
        self.history.append(record)
        print(f"epoch {self.current_epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))

    # -- resuming -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What a resumed run needs besides Lightning's state: its history and the epoch's running sums so far,
        the random states, and ``resume_info`` (the run_key, its W&B run; crisp.training.checkpoints)."""
        from lightning_fabric.utilities.seed import _collect_rng_states

        from crisp.training.checkpoints import position

        checkpoint["crisp"] = {
            **self.resume_info, "history": self.history, "last_val": self.last_val, "last_layers": self.last_layers,
            "train_loss": _metric_state(self.train_loss), "train_correct": _metric_state(self.train_correct),
            "train_stats": self.train_stats.state(), "rng": _collect_rng_states(include_cuda=torch.cuda.is_available()),
        }
        checkpoint["crisp_position"] = position(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["crisp"]
        self.history, self.last_val, self.last_layers = state["history"], state["last_val"], state["last_layers"]
        self._resumed = {**state, "position": checkpoint["crisp_position"]}
        self.resumed_from_step = checkpoint["global_step"]

    def on_train_start(self) -> None:
        """A resumed run's running sums and random states, set once everything that draws at the start has drawn."""
        state, self._resumed = getattr(self, "_resumed", None), None
        if state is None:
            return
        from lightning_fabric.utilities.seed import _set_rng_states

        _load_metric(self.train_loss, state["train_loss"])
        _load_metric(self.train_correct, state["train_correct"])
        self.train_stats.load(state["train_stats"], self.device)
        _set_rng_states(state["rng"])
        if state["position"]["batches"] == 0:
            # an epoch's data iterator draws a seed from the global stream when the epoch starts; the state
            # saved at the end of the last epoch is from before that draw, which this epoch's made already
            torch.empty((), dtype=torch.int64).random_()

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        decayed, not_decayed = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
        optimizer = adamw(self.encoder, self.optim, decayed, not_decayed)
        total = stepping_batches(self, self.manual["accumulate"])
        return {"optimizer": optimizer, "lr_scheduler": linear_schedule(optimizer, self.optim.warmup_ratio, total)}


def _metric_state(metric) -> dict:
    """A torchmetrics metric's running state (its tensors and update count), for a checkpoint."""
    return {"state": {name: getattr(metric, name) for name in metric._defaults}, "updates": metric._update_count}


def _load_metric(metric, saved: dict) -> None:
    for name, value in saved["state"].items():
        setattr(metric, name, value.to(metric.device) if torch.is_tensor(value) else value)
    metric._update_count = saved["updates"]
