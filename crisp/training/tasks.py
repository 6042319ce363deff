"""The GLUE tasks: for each, its text fields, labels (or regression), official metrics and validation splits.

A task is one :class:`Task` here and one yaml in ``conf/data/`` whose ``hub_config`` names it (the task's
config name in ``nyu-mll/glue``). Its files come from the hub through ``datasets`` or from a GLUE-format
folder (``data.dir``): how each file lays out its columns is :class:`Tsv`'s.

Metrics are computed on a validation split's predictions all at once (:func:`metrics`): the task's
official ones (the first is the primary one the report uses), plus accuracy for every classification
task and F1 for every binary one. A task validated on several splits (MNLI: matched, mismatched) names
the first split's metrics plainly (``val_acc``) and the others' with the split's name
(``val_acc_mismatched``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics import functional as M

from crisp.core.errors import ConfigError


@dataclass(frozen=True)
class Tsv:
    """How a GLUE-format file holds a task: columns by header name, or by position when it has no header."""

    text: tuple[str | int, ...]
    label: str | int
    header: bool = True


@dataclass(frozen=True)
class Task:
    name: str
    folder: str  # the GLUE folder's name: CoLA, SST-2, ...
    fields: tuple[str, ...]  # the hub's text columns: one sentence, or a pair
    labels: tuple[str, ...] | None  # the label values as a GLUE file writes them, in id order; None: regression
    metrics: tuple[str, ...]  # official, primary first
    tsv: Tsv
    validation: tuple[tuple[str, str], ...] = (("validation", "dev.tsv"),)  # (hub split, GLUE file)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def pair(self) -> bool:
        return len(self.fields) == 2

    @property
    def recorded(self) -> tuple[str, ...]:
        """Every metric recorded per validation split: the official ones, accuracy, and F1 when binary."""
        extra = () if self.regression else ("acc",) + (("f1",) if self.num_labels == 2 else ())
        return self.metrics + tuple(m for m in extra if m not in self.metrics)

    @property
    def splits(self) -> list[str]:
        """Suffix of each validation split's metric names: '' for the first, then the split's own name."""
        return [""] + [f"_{hub.removeprefix('validation_')}" for hub, _ in self.validation[1:]]

    @property
    def primary(self) -> str:
        """The results key of the metric the report compares: ``val_mcc``, ``val_acc``, ``val_pearson``, ..."""
        return f"val_{self.metrics[0]}"


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")
TASKS: dict[str, Task] = {task.name: task for task in (
    Task("cola", "CoLA", ("sentence",), BINARY, ("mcc",), Tsv((3,), 1, header=False)),
    Task("sst2", "SST-2", ("sentence",), BINARY, ("acc",), Tsv(("sentence",), "label")),
    Task("mrpc", "MRPC", ("sentence1", "sentence2"), BINARY, ("f1", "acc"),
         Tsv(("#1 String", "#2 String"), "Quality")),
    Task("stsb", "STS-B", ("sentence1", "sentence2"), None, ("pearson", "spearman"),
         Tsv(("sentence1", "sentence2"), "score")),
    Task("qqp", "QQP", ("question1", "question2"), BINARY, ("f1", "acc"),
         Tsv(("question1", "question2"), "is_duplicate")),
    Task("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("acc",),
         Tsv(("sentence1", "sentence2"), "gold_label"),
         validation=(("validation_matched", "dev_matched.tsv"), ("validation_mismatched", "dev_mismatched.tsv"))),
    Task("qnli", "QNLI", ("question", "sentence"), NLI2, ("acc",), Tsv(("question", "sentence"), "label")),
    Task("rte", "RTE", ("sentence1", "sentence2"), NLI2, ("acc",), Tsv(("sentence1", "sentence2"), "label")),
    Task("wnli", "WNLI", ("sentence1", "sentence2"), BINARY, ("acc",), Tsv(("sentence1", "sentence2"), "label")),
)}


def task_of(data_cfg) -> Task:
    """The task of a data config (``data.hub_config``; the synthetic data mimics SST-2)."""
    name = data_cfg.get("hub_config")
    if name not in TASKS:
        raise ConfigError(f"data.hub_config={name!r} is not allowed: choose one of {', '.join(TASKS)}")
    return TASKS[name]


def predictions(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """What the metrics compare with the labels: the class, or the regression output."""
    return logits[..., 0].float() if task.regression else logits.argmax(-1)


def loss(task: Task, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the classes, or MSE of the single output (STS-B)."""
    logits = logits.float()
    if task.regression:
        return torch.nn.functional.mse_loss(logits[..., 0], labels.float(), reduction=reduction)
    return torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)


def _accuracy(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (preds == target).float().mean()


# each metric from a split's predictions and labels, all at once
METRICS = {
    "acc": _accuracy,
    "f1": M.classification.binary_f1_score,
    "mcc": M.classification.binary_matthews_corrcoef,
    "pearson": lambda preds, target: M.pearson_corrcoef(preds.double(), target.double()),
    "spearman": lambda preds, target: M.spearman_corrcoef(preds.double(), target.double()),
}


def metrics(task: Task, preds: torch.Tensor, target: torch.Tensor, suffix: str = "") -> dict[str, float]:
    """The recorded metrics of one validation split (``suffix``: the split's, see :attr:`Task.splits`)."""
    return {f"val_{name}{suffix}": METRICS[name](preds, target).item() for name in task.recorded}
