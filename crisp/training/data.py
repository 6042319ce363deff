"""A task's data (a GLUE task, your own files, a hub dataset, a saved folder, or generated), every row
checked, tokenized once, as a LightningDataModule.

Each ``data.source`` reads its rows into tables (:mod:`crisp.training.delimited` for csv and tsv,
:mod:`crisp.training.dataset_tables` for the rest, through ``datasets``) that :mod:`crisp.training.rows`
checks row by row: a bad row stops the run before anything trains, naming its file and line. Label
names the task leaves undeclared are read from the training split.

Examples are tokenized once per (data, tokenizer, max length) and cached under ``~/.cache/crisp``; a
pair is one sequence the way its tokenizer joins two (``token_type_ids`` kept where the encoder family
reads them). Batches are slices of one padded tensor, trimmed to the longest example in the batch
(dynamic padding), so loading costs almost nothing next to a training step. (``datasets``' own
fingerprinted ``map`` cache would store the same ids as Arrow rows, to be padded into a tensor again
each run: the tensors themselves are cached instead.)
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from crisp.core.data_config import FILE_FORMATS, glue_folder_problem, source_of
from crisp.core.errors import DataError
from crisp.core.model_dirs import CACHE_DIR
from crisp.training.dataset_tables import load_disk, read_file, split_tables
from crisp.training.delimited import read_delimited
from crisp.training.hub import load_hub_dataset
from crisp.training.rows import Rows, Split, label_names, to_split
from crisp.training.synthetic import _POSITIVE, generate_synthetic
from crisp.training.tasks import TASKS, Task, task_of

__all__ = ["_POSITIVE", "DataError", "Split", "TaskDataModule", "TokenizedSplit", "generate_synthetic", "load",
           "load_hub", "load_local", "read_glue_tsv", "tokenize"]
COLUMNS_HINT = " (data.text_fields and data.label_field name the columns)"


# ----------------------------------------------------------------------------------------------
# Sources: each gives the tables of the training split and of every validation split of the task


def _glue_table(path: Path, task: Task) -> Rows:
    """One GLUE-format file of ``task``, laid out as its preset's ``glue`` keys say."""
    if not path.is_file():
        raise DataError(f"data.dir: missing file {path} (a GLUE {task.folder} folder holds train.tsv and "
                        f"{' and '.join(file for _, file in task.validation)})")
    return read_delimited(path, task.tsv.text, task.tsv.label, delimiter="\t", header=task.tsv.header,
                          hint=f" (a GLUE {task.folder} file)")


def read_glue_tsv(path: Path, task: Task | None = None) -> Split:
    """One GLUE-format file of ``task`` (SST-2 by default); every problem is reported with its line."""
    task = task or TASKS["sst2"]
    return to_split(_glue_table(path, task), task)


def _glue_folder_tables(cfg: DictConfig, task: Task) -> dict[str, Rows]:
    layout = {"folder": task.folder, "validation_files": [file for _, file in task.validation]}
    problem = glue_folder_problem(str(cfg.dir), layout)
    if problem:
        raise DataError(problem)
    folder = Path(cfg.dir).expanduser()
    return {"train": _glue_table(folder / "train.tsv", task),
            **{split: _glue_table(folder / file, task) for split, file in task.validation}}


def _hub_tables(cfg: DictConfig, task: Task) -> dict[str, Rows]:
    dataset = load_hub_dataset(cfg.hub_path, cfg.get("hub_config"))
    where = cfg.hub_path + (f" ({cfg.hub_config})" if cfg.get("hub_config") else "")
    splits = {"train": cfg.get("train_split") or "train", **{name: name for name, _ in task.validation}}
    return split_tables(dataset, where, splits, task.fields, task.label_field, COLUMNS_HINT)


def _file_table(path: Path, task: Task) -> Rows:
    if not path.is_file():  # the config's check found it: it went since
        raise DataError(f"{path}: missing file")
    kind = FILE_FORMATS[path.suffix.lower()]
    if kind in ("csv", "tsv"):
        return read_delimited(path, task.fields, task.label_field, delimiter="," if kind == "csv" else "\t",
                              hint=COLUMNS_HINT)
    return read_file(path, kind, task.fields, task.label_field, COLUMNS_HINT)


def _files_tables(cfg: DictConfig, task: Task) -> dict[str, Rows]:
    files = {"train": cfg.train_file, **dict(task.validation)}
    return {name: _file_table(Path(file).expanduser(), task) for name, file in files.items()}


def _disk_tables(cfg: DictConfig, task: Task) -> dict[str, Rows]:
    folder = Path(cfg.path).expanduser()
    splits = {"train": cfg.train_split, **{name: name for name, _ in task.validation}}
    return split_tables(load_disk(folder), str(folder), splits, task.fields, task.label_field, COLUMNS_HINT)


def _glue_tables(cfg: DictConfig, task: Task) -> dict[str, Rows]:
    return _glue_folder_tables(cfg, task) if cfg.get("dir") else _hub_tables(cfg, task)


TABLES = {"glue": _glue_tables, "files": _files_tables, "hub": _hub_tables, "disk": _disk_tables}


def _splits(tables: dict[str, Rows], task: Task) -> dict[str, Split]:
    return {name: to_split(table, task) for name, table in tables.items()}


def load_local(cfg: DictConfig, task: Task | None = None) -> dict[str, Split]:
    """A GLUE-format folder's (``cfg.dir``) splits of ``task`` (SST-2 by default)."""
    task = task or TASKS["sst2"]
    return _splits(_glue_folder_tables(cfg, task), task)


def load_hub(cfg: DictConfig, task: Task) -> dict[str, Split]:
    """``task``'s splits from a hub dataset (``cfg.hub_path``, ``cfg.hub_config``)."""
    return _splits(_hub_tables(cfg, task), task)


def load_synthetic(cfg: DictConfig, task: Task) -> dict[str, Split]:
    return {
        "train": generate_synthetic(cfg.num_train, cfg.data_seed),
        "validation": generate_synthetic(cfg.num_val, cfg.data_seed + 1_000_003),
    }


def load(cfg: DictConfig) -> tuple[Task, dict[str, Split]]:
    """The task (its label names read from the training split where it declares none) and its training and
    validation splits, every row checked, each cut to ``data.train_limit``/``data.val_limit``."""
    task = task_of(cfg)
    source = source_of(cfg)
    if source == "synthetic":
        splits = load_synthetic(cfg, task)
    else:
        tables = TABLES[source](cfg, task)
        labels_from = tables["train"].where if task.labels is None and not task.regression else None
        if labels_from:
            task = task.with_labels(label_names(tables["train"]))
        splits = {name: to_split(table, task, labels_from) for name, table in tables.items()}
    for split in splits:
        limit = cfg.train_limit if split == "train" else cfg.val_limit
        if limit is not None:
            part = splits[split]
            splits[split] = Split(part.texts[:limit], part.labels[:limit], part.pairs and part.pairs[:limit])
        if not splits[split].texts:
            raise DataError(f"data={cfg.name}: the {split} split is empty")
    return task, splits


# ----------------------------------------------------------------------------------------------
# Tokenization (cached) and batches


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class TokenizedSplit(torch.utils.data.Dataset):
    """One padded id tensor (and token types, for pairs of an encoder that reads them); ``__getitems__``
    returns a whole batch trimmed to its longest example."""

    def __init__(self, input_ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None):
        self.input_ids, self.lengths, self.labels, self.token_type_ids = input_ids, lengths, labels, token_type_ids
        self.multiple = 1

    def pad_to_multiple_of(self, multiple: int, limit: int) -> TokenizedSplit:
        """Pad every batch to a multiple of ``multiple`` tokens (at most ``limit``): few batch shapes."""
        self.multiple = multiple
        widest = min(round_up(self.input_ids.size(1), multiple), limit)
        if widest > self.input_ids.size(1):  # the extra columns are masked out: any id will do
            extra = self.input_ids.new_zeros(len(self.input_ids), widest - self.input_ids.size(1))
            self.input_ids = torch.cat([self.input_ids, extra], dim=1)
            if self.token_type_ids is not None:
                self.token_type_ids = torch.cat([self.token_type_ids, extra], dim=1)
        return self

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices)
        width = int(self.lengths[index].max())
        if self.multiple > 1:
            width = min(round_up(width, self.multiple), self.input_ids.size(1))
        batch = {"input_ids": self.input_ids[index, :width],
                 "attention_mask": (torch.arange(width) < self.lengths[index, None]).long()}
        if self.token_type_ids is not None:
            batch["token_type_ids"] = self.token_type_ids[index, :width]
        return {**batch, "labels": self.labels[index]}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def _fingerprint(tokenizer, split: Split, max_length: int, token_types: bool) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(f"{max_length}\0{len(split.texts)}\0".encode())
    if split.pairs is not None:  # single sentences hash as they always did: their cache stays valid
        h.update(f"pairs\0{token_types}\0".encode())
    for text, pair, label in zip(split.texts, split.pairs or [None] * len(split.texts), split.labels, strict=True):
        h.update(f"{text}\0{label}\n".encode() if pair is None else f"{text}\0{pair}\0{label}\n".encode())
    return h.hexdigest()[:24]


def _padded(rows: list[list[int]], lengths: torch.Tensor, pad: int) -> torch.Tensor:
    out = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    # every example left-aligned in its row, all at once (a boolean mask fills row by row)
    out[torch.arange(out.size(1)) < lengths[:, None]] = torch.tensor(list(itertools.chain(*rows)))
    return out


def tokenize(tokenizer, split: Split, max_length: int, cache: bool = True, token_types: bool = False) -> TokenizedSplit:
    """``split`` as ids; a pair joined the tokenizer's way, with its token types when ``token_types``."""
    path = CACHE_DIR / "tokenized" / f"{_fingerprint(tokenizer, split, max_length, token_types)}.pt"
    if cache and path.is_file():
        return TokenizedSplit(**torch.load(path))
    args = (split.texts,) if split.pairs is None else (split.texts, split.pairs)
    typed = token_types and split.pairs is not None
    encoded = tokenizer(*args, truncation=True, max_length=max_length, return_token_type_ids=typed)
    lengths = torch.tensor([len(ids) for ids in encoded["input_ids"]])
    dtype = torch.float32 if split.labels and isinstance(split.labels[0], float) else torch.long
    tensors = {"input_ids": _padded(encoded["input_ids"], lengths, tokenizer.pad_token_id), "lengths": lengths,
               "labels": torch.tensor(split.labels, dtype=dtype)}
    if typed:
        tensors["token_type_ids"] = _padded(encoded["token_type_ids"], lengths, 0)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(tensors, tmp)
        os.replace(tmp, path)
    return TokenizedSplit(**tensors)


def _identity(batch):
    return batch


def loader_worker_init(worker_id: int) -> None:
    """A data-loader worker leaves the scheduler's signals to its training process: SLURM's
    time-limit warning (SIGUSR2) reaches every process of a task, and a forked worker would
    otherwise run submitit's requeue handler too."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class ResumableBatches(BatchSampler):
    """A BatchSampler over a seeded RandomSampler that can start mid-way: :meth:`resume_at` makes its next
    iteration the run's ``epoch``-th, less the batches already trained. Its generator is replayed from the
    seed through the earlier epochs as training drew from it (``per_epoch`` batches each; a loop that stops
    at the epoch's length never draws the sampler's trailing empty permutation), so a resumed run sees
    exactly the batches it would have seen."""

    def __init__(self, sampler: RandomSampler, batch_size: int, seed: int):
        super().__init__(sampler, batch_size, drop_last=False)
        self.seed = seed
        self._resume: tuple[int, int, int] | None = None

    def resume_at(self, epoch: int, batches: int, per_epoch: int) -> None:
        self._resume = (epoch, batches, per_epoch)

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            epoch, skip, per_epoch = self._resume
            self._resume = None
            self.sampler.generator.manual_seed(self.seed)
            for _ in range(epoch):
                batches = super().__iter__()
                for _ in range(min(per_epoch, len(self))):
                    next(batches)
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


def pin_memory(data: DictConfig, on_gpu: bool) -> bool:
    """Whether batches are loaded into pinned memory: ``data.pin_memory``, where ``auto`` is on when training on GPU."""
    return on_gpu if data.get("pin_memory", "auto") == "auto" else bool(data.pin_memory)


class TaskDataModule(pl.LightningDataModule):
    """The training split in the seed's order and every validation split of the task, in order."""

    def __init__(self, cfg: DictConfig, train: TokenizedSplit, vals: list[TokenizedSplit], seed: int,
                 pin_memory: bool = False, pad_to_multiple_of: int = 1):
        super().__init__()
        self.cfg, self.seed, self.pin_memory = cfg, seed, pin_memory
        self.train = train
        self.vals = vals  # in the task's order: the first is the one results name plainly
        if pad_to_multiple_of > 1:
            self.train.pad_to_multiple_of(pad_to_multiple_of, cfg.max_length)
        self._resume: dict | None = None

    def state_dict(self) -> dict:
        """Where training is in the run's batch order (saved with a checkpoint; crisp.training.checkpoints)."""
        from crisp.training.checkpoints import position

        return position(self.trainer)

    def load_state_dict(self, state: dict) -> None:
        self._resume = state

    def _loader(self, dataset: TokenizedSplit, batch_size: int, shuffle: bool, generator=None) -> DataLoader:
        if shuffle:
            batches = ResumableBatches(RandomSampler(dataset, generator=generator), batch_size, self.seed)
            if self._resume is not None:
                batches.resume_at(self._resume["epoch"], self._resume["batches"], self._resume["per_epoch"])
                self._resume = None
        else:
            batches = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
        return DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=_identity,
            num_workers=self.cfg.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.cfg.num_workers > 0,
            worker_init_fn=loader_worker_init,
        )

    def train_dataloader(self) -> DataLoader:
        # its own generator: the order depends on the seed alone, not on what ran before
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self.train, self.cfg.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(val, self.cfg.eval_batch_size, shuffle=False) for val in self.vals]



def calibration_batches(train: TokenizedSplit, batch_size: int, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` training batches chosen from the seed alone (for the adaptive strategy)."""
    generator = torch.Generator().manual_seed(seed + 7919)
    order = torch.randperm(len(train), generator=generator).tolist()
    starts = range(0, min(count * batch_size, len(order)), batch_size)
    return [train.__getitems__(order[start : start + batch_size]) for start in starts]
