"""A task as its data config declares it: text fields, labels (or regression), metrics and validation splits.

A task is data, not code (:mod:`crisp.core.data_config` checks its keys): ``data.text_fields`` (one, or a
pair), ``data.label_field``, ``data.labels`` (class names in id order; null: read from the training split
when it loads, :meth:`Task.with_labels`) or ``data.regression: [low, high]``, and ``data.metric``, the primary
first. GLUE's nine tasks are nine presets in ``conf/data/`` (:data:`TASKS`), declared with the same keys, each
with its GLUE folder's layout (:class:`Tsv`).

Metrics are computed on a validation split's predictions all at once (:func:`metrics`): the declared ones
(the first is the primary one the report uses), plus accuracy for every classification task and F1 for
every binary one. A task validated on several splits (MNLI: matched, mismatched) names the first split's
metrics plainly (``val_acc``) and the others' with the split's name (``val_acc_mismatched``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from omegaconf import OmegaConf
from torchmetrics import functional as M

from crisp.core.config import CONF_DIR
from crisp.core.data_config import (
    as_list,
    source_of,
    task_name,
    validation_names,
)


@dataclass(frozen=True)
class Tsv:
    """How a GLUE-format file holds a task: columns by header name, or by position when it has no header."""

    text: tuple[str | int, ...]
    label: str | int
    header: bool = True


@dataclass(frozen=True)
class Task:
    name: str
    fields: tuple[str, ...]  # the text columns: one sentence, or a pair
    labels: tuple[str, ...] | None  # class names in id order; None: a regression, or not read yet
    metrics: tuple[str, ...]  # declared, primary first
    validation: tuple[tuple[str, str], ...] = (("validation", "dev.tsv"),)  # (split, its file or the hub's split)
    label_field: str = "label"
    target_range: tuple[float, float] | None = None  # a regression's
    folder: str = ""  # a GLUE task's folder name: CoLA, SST-2, ...
    tsv: Tsv | None = None  # a GLUE task's file layout

    @property
    def regression(self) -> bool:
        return self.target_range is not None

    @property
    def num_labels(self) -> int:
        if self.regression:
            return 1
        if self.labels is None:
            raise ValueError(f"task {self.name}: its label names are read with its training split (with_labels)")
        return len(self.labels)

    @property
    def pair(self) -> bool:
        return len(self.fields) == 2

    @property
    def recorded(self) -> tuple[str, ...]:
        """Every metric recorded per validation split: the declared ones, accuracy, and F1 when binary."""
        extra = () if self.regression else ("acc",) + (("f1",) if self.num_labels == 2 else ())
        return self.metrics + tuple(m for m in extra if m not in self.metrics)

    @property
    def splits(self) -> list[str]:
        """Suffix of each validation split's metric names: '' for the first, then the split's own name."""
        return [""] + [f"_{name.removeprefix('validation_')}" for name, _ in self.validation[1:]]

    @property
    def primary(self) -> str:
        """The results key of the metric the report compares: ``val_mcc``, ``val_acc``, ``val_pearson``, ..."""
        return f"val_{self.metrics[0]}"

    def with_labels(self, names: tuple[str, ...]) -> Task:
        """The task with the label names read from its training split."""
        return replace(self, labels=tuple(names))


def _validation_places(data, source: str) -> list[str]:
    """Where each validation split is: a GLUE folder's file, a file, or the dataset's split (generated: none)."""
    if source == "glue":
        return as_list(data.get("glue").get("validation_files"))
    if source == "files":
        return as_list(data.get("validation_file"))
    return [""] if source == "synthetic" else as_list(data.get("validation_split"))


def task_of(data) -> Task:
    """The task a data config declares (``data`` checked by :func:`crisp.core.data_config.check`)."""
    regression, labels, source = as_list(data.get("regression")), as_list(data.get("labels")), source_of(data)
    layout = data.get("glue") if source == "glue" else None
    return Task(
        name=task_name(data),
        fields=tuple(as_list(data.get("text_fields"))),
        labels=tuple(str(n) for n in labels) if labels else None,
        metrics=tuple(as_list(data.get("metric"))) or (("pearson", "spearman") if regression else ("acc",)),
        validation=tuple(zip(validation_names(data), map(str, _validation_places(data, source)), strict=True)),
        label_field=str(data.get("label_field")),
        target_range=(float(regression[0]), float(regression[1])) if regression else None,
        folder=str(layout.get("folder")) if layout else "",
        tsv=Tsv(tuple(as_list(layout.get("text_columns"))), layout.get("label_column"), bool(layout.get("header")))
        if layout else None,
    )


def glue_tasks() -> dict[str, Task]:
    """GLUE's tasks as their presets in ``conf/data/`` declare them, in GLUE's order."""
    presets = {}
    for path in (CONF_DIR / "data").glob("*.yaml"):
        node = OmegaConf.load(path)
        if node.get("source") == "glue" and node.get("name") == node.get("hub_config"):
            presets[node.name] = task_of(node)
    glue = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]  # GLUE's own order
    return {name: presets[name] for name in [n for n in glue if n in presets] + sorted(set(presets) - set(glue))}


TASKS: dict[str, Task] = glue_tasks()


def predictions(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """What the metrics compare with the labels: the class, or the regression output."""
    return logits[..., 0].float() if task.regression else logits.argmax(-1)


def loss(task: Task, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the classes, or MSE of the single output (a regression)."""
    logits = logits.float()
    if task.regression:
        return torch.nn.functional.mse_loss(logits[..., 0], labels.float(), reduction=reduction)
    return torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)


def _accuracy(preds: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    return (preds == target).float().mean()


def _f1(preds: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """Binary: the second label's F1; more classes: the mean of the classes' F1 (macro)."""
    if classes == 2:
        return M.classification.binary_f1_score(preds, target)
    return M.classification.multiclass_f1_score(preds, target, classes, average="macro")


def _mcc(preds: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    if classes == 2:
        return M.classification.binary_matthews_corrcoef(preds, target)
    return M.classification.multiclass_matthews_corrcoef(preds, target, classes)


def _scores(metric):
    return lambda preds, target, classes: metric(preds.double(), target.double())


# each metric from a split's predictions and labels, all at once (the names crisp.core.data_config allows)
METRICS = {
    "acc": _accuracy,
    "f1": _f1,
    "mcc": _mcc,
    "pearson": _scores(M.pearson_corrcoef),
    "spearman": _scores(M.spearman_corrcoef),
    "kendall": _scores(M.kendall_rank_corrcoef),
    "r2": _scores(M.r2_score),
}


def metrics(task: Task, preds: torch.Tensor, target: torch.Tensor, suffix: str = "") -> dict[str, float]:
    """The recorded metrics of one validation split (``suffix``: the split's, see :attr:`Task.splits`)."""
    return {f"val_{name}{suffix}": METRICS[name](preds, target, task.num_labels).item() for name in task.recorded}
