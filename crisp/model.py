"""The LightningModule: a sequence classifier whose attention layers are sparsified by crisp."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score
from transformers import get_linear_schedule_with_warmup

import crisp
from crisp.attention import attention_modules
from crisp.graphs import GraphedTrainStep
from crisp.strategies import MODEL_INPUTS, STRATEGIES


class LayerStatsMeter:
    """Mean of per-layer [achieved sparsity, entropy] over the batches that tracked them, kept on the device."""

    def __init__(self):
        self.total, self.count = None, 0

    def update(self, modules) -> None:
        stats = torch.stack([m.crisp_stats for m in modules])
        self.total = stats if self.total is None else self.total + stats
        self.count += 1

    def compute(self) -> list[list[float]] | None:
        if self.total is None:
            return None
        values = (self.total / self.count).tolist()
        self.total, self.count = None, 0
        return values


class SparseClassifier(pl.LightningModule):
    """Fine-tunes ``encoder`` with cross-entropy and AdamW. With ``cuda_graphs`` each training step's
    forward and backward replay a CUDA graph (crisp/graphs.py) and the optimizer steps manually."""

    def __init__(self, encoder: torch.nn.Module, cfg: DictConfig, cuda_graphs: bool = False):
        super().__init__()
        self.automatic_optimization = not cuda_graphs
        self.graphed_step: GraphedTrainStep | None = None
        # from_pretrained returns eval mode, and Lightning keeps submodules' modes: dropout must be on
        self.encoder = encoder.train()
        self.sparsity = cfg.sparsity
        self.strategy = OmegaConf.to_container(cfg.strategy, resolve=True)
        self.optim = cfg.optim
        self.apply_in_eval = cfg.sparsifier.apply_in_eval
        self.stats_every = max(1, cfg.sparsifier.stats_every_n_steps)
        self.calibration_count = cfg.data.calibration_batches
        self.attention = attention_modules(encoder)
        # no input checks: they would wait for the GPU on every step; a NaN loss is caught per epoch
        self.train_loss, self.val_loss = MeanMetric(nan_strategy="disable"), MeanMetric(nan_strategy="disable")
        self.train_acc = BinaryAccuracy(validate_args=False)
        self.val_acc, self.val_f1 = BinaryAccuracy(validate_args=False), BinaryF1Score(validate_args=False)
        self.train_stats, self.val_stats = LayerStatsMeter(), LayerStatsMeter()
        self.layer_sparsity: list[float] = []
        self.history: list[dict] = []
        self.last_val: dict = {}
        self.last_layers: dict = {}

    # -- sparsity -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        params = {k: v for k, v in self.strategy.items() if k != "name"}
        name = self.strategy["name"]
        batches = None
        if STRATEGIES[name].needs_entropy and self.sparsity > 0:
            batches = self.trainer.datamodule.calibration_batches(self.calibration_count)
        self.layer_sparsity = crisp.apply_strategy(self.encoder, name, self.sparsity, batches, **params)
        crisp.configure(self.encoder, apply_in_eval=self.apply_in_eval, track_stats=False)
        allocation = ", ".join(f"{s:.3f}" for s in self.layer_sparsity)
        print(f"crisp: strategy={name} sparsity={self.sparsity:g} -> per-layer sparsity [{allocation}]")

    def _track(self, enabled: bool) -> None:
        for module in self.attention:
            module.crisp_track_stats = enabled

    # -- steps ----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits

    def _loss_and_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch)
        return F.cross_entropy(logits, batch["labels"]), logits

    def _graphed_training_step(self, batch: dict[str, torch.Tensor], track: bool):
        if self.graphed_step is None:
            self.graphed_step = GraphedTrainStep(self._loss_and_logits, list(self.encoder.parameters()))
        # a graph bakes in whether statistics are recorded and every layer's sparsity
        key = (track, tuple(getattr(m, "crisp_sparsity", 0.0) for m in self.attention))
        return self.graphed_step.optimizer_step(self, batch, key)

    def training_step(self, batch, batch_idx):
        track = batch_idx % self.stats_every == 0
        self._track(track)
        if self.automatic_optimization:
            loss, logits = self._loss_and_logits(batch)
        else:
            loss, logits = self._graphed_training_step(batch, track)
        if track:
            self.train_stats.update(self.attention)
        # metrics accumulate on the device: no host synchronisation in the hot loop
        self.train_loss.update(loss.detach())
        self.train_acc.update(logits.detach().argmax(-1), batch["labels"])
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        self._track(True)
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        self.val_stats.update(self.attention)
        self.val_loss.update(loss / len(logits), weight=len(logits))
        preds = logits.argmax(-1)
        self.val_acc.update(preds, batch["labels"])
        self.val_f1.update(preds, batch["labels"])

    def _layer_metrics(self, stage: str, meter: LayerStatsMeter) -> dict[str, float]:
        """Per-layer achieved sparsity and entropy of this epoch: kept for results.json and logged."""
        layers = meter.compute()
        if layers is None:
            return {}
        self.last_layers[f"{stage}_achieved"] = [a for a, _ in layers]
        self.last_layers[f"{stage}_entropy"] = [h for _, h in layers]
        metrics = {}
        for i, (achieved, entropy) in enumerate(layers):
            metrics[f"layers/{i}/{stage}_achieved_sparsity"] = achieved
            metrics[f"layers/{i}/{stage}_entropy"] = entropy
        return metrics

    def on_validation_epoch_end(self) -> None:
        self.last_val = {
            "val_loss": self.val_loss.compute().item(),
            "val_acc": self.val_acc.compute().item(),
            "val_f1": self.val_f1.compute().item(),
        }
        for metric in (self.val_loss, self.val_acc, self.val_f1):
            metric.reset()
        metrics = {f"val/{k.removeprefix('val_')}": v for k, v in self.last_val.items()}
        metrics |= self._layer_metrics("val", self.val_stats)
        if not self.trainer.sanity_checking:
            self.log_dict(metrics, prog_bar=False, sync_dist=True)  # DDP: one value for all ranks

    def on_train_epoch_end(self) -> None:
        train_loss = self.train_loss.compute().item()
        train_acc = self.train_acc.compute().item()
        self.train_loss.reset()
        self.train_acc.reset()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"the training loss became {train_loss} in epoch {self.current_epoch}")
        metrics = {"train/epoch_loss": train_loss, "train/acc": train_acc}
        metrics |= self._layer_metrics("train", self.train_stats)
        self.log_dict(metrics, sync_dist=True)
        record = {"epoch": self.current_epoch, "train_loss": train_loss, "train_acc": train_acc, **self.last_val}
        self.history.append(record)
        val = " ".join(f"{k}={v:.4f}" for k, v in self.last_val.items())
        print(f"epoch {self.current_epoch}: train_loss={train_loss:.4f} train_acc={train_acc:.4f} {val}")

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for param in self.encoder.parameters():
            if param.requires_grad:
                # biases and LayerNorm weights are not decayed (the usual BERT fine-tuning recipe)
                (no_decay if param.ndim < 2 else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = self.optim.fused
        on_cuda = next(self.encoder.parameters()).is_cuda
        fused = on_cuda if fused == "auto" else bool(fused)
        optimizer = torch.optim.AdamW(
            groups, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps, fused=fused or None
        )
        total = self.trainer.estimated_stepping_batches
        scheduler = get_linear_schedule_with_warmup(optimizer, round(self.optim.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
