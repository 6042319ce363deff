"""A task's data (the hub, a GLUE-format folder, or generated), tokenized once, as a LightningDataModule.

Examples are tokenized once per (data, tokenizer, max length) and cached under ``~/.cache/crisp``; a
pair is one sequence the way its tokenizer joins two (``token_type_ids`` kept where the encoder family
reads them). Batches are slices of one padded tensor, trimmed to the longest example in the batch
(dynamic padding), so loading costs almost nothing next to a training step.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from crisp.core.errors import DataError
from crisp.core.model_dirs import CACHE_DIR
from crisp.training.hub import load_hub_dataset
from crisp.training.tasks import TASKS, Task, task_of


@dataclass
class Split:
    texts: list[str]
    labels: list[int] | list[float]
    pairs: list[str] | None = None  # the second sentence of each example, for pair tasks


# ----------------------------------------------------------------------------------------------
# Sources: each returns {"train": Split, <each validation split of the task>: Split}


def _label(task: Task, value: str, where: str) -> int | float:
    if task.regression:
        try:
            return float(value)
        except ValueError:
            raise DataError(f"{where}: label={value!r} is not allowed: it must be a number") from None
    if value not in task.labels:
        raise DataError(f"{where}: label={value!r} is not allowed: labels must be {' or '.join(task.labels)}")
    return task.labels.index(value)


def read_glue_tsv(path: Path, task: Task | None = None) -> Split:
    """One GLUE-format file of ``task`` (SST-2 by default); every problem is reported with its line.

    Quotes are plain characters (several GLUE files hold unbalanced ones) and a UTF-8 byte-order mark
    is not part of the header (MRPC's files start with one)."""
    task = task or TASKS["sst2"]
    if not path.is_file():
        raise DataError(f"data.dir: missing file {path} (a GLUE {task.folder} folder holds train.tsv and "
                        f"{' and '.join(file for _, file in task.validation)})")
    layout = task.tsv
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    first = 1
    if layout.header:
        header, rows, first = (rows[0] if rows else []), rows[1:], 2
        missing = [c for c in (*layout.text, layout.label) if c not in header]
        if missing:
            raise DataError(f"{path}: header {header!r} lacks the column(s) {', '.join(map(repr, missing))}")
        columns, width = [header.index(c) for c in (*layout.text, layout.label)], len(header)
    else:
        columns, width = [*layout.text, layout.label], len(rows[0]) if rows else 0
    texts, pairs, labels = [], [], []
    for line, row in enumerate(rows, start=first):
        if not row:
            continue
        if len(row) != width:
            raise DataError(f"{path}:{line}: expected {width} tab-separated fields, got {len(row)}")
        *text, label = (row[c] for c in columns)
        labels.append(_label(task, label, f"{path}:{line}"))
        texts.append(text[0].strip())
        if task.pair:
            pairs.append(text[1].strip())
    if not texts:
        raise DataError(f"{path}: no examples (the split is empty)")
    return Split(texts, labels, pairs if task.pair else None)


def load_local(cfg: DictConfig, task: Task | None = None) -> dict[str, Split]:
    task = task or TASKS["sst2"]
    folder = Path(cfg.dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.dir={str(cfg.dir)!r} is not a folder (it must hold GLUE {task.folder}'s train.tsv and "
                        f"{' and '.join(file for _, file in task.validation)})")
    splits = {"train": read_glue_tsv(folder / "train.tsv", task)}
    for split, file in task.validation:
        splits[split] = read_glue_tsv(folder / file, task)
    return splits


def load_hub(cfg: DictConfig, task: Task) -> dict[str, Split]:
    dataset = load_hub_dataset(cfg.hub_path, cfg.hub_config)
    splits = {}
    for split in ("train", *(hub for hub, _ in task.validation)):
        part = dataset[split]
        texts, *pairs = ([t.strip() for t in part[field]] for field in task.fields)
        labels = [float(y) for y in part["label"]] if task.regression else [int(y) for y in part["label"]]
        splits[split] = Split(texts, labels, pairs[0] if pairs else None)
    return splits


_POSITIVE = ["good", "great", "superb", "charming", "moving", "delightful", "brilliant", "funny", "warm", "fresh",
             "witty", "touching"]
_NEGATIVE = ["bad", "dull", "boring", "awful", "tedious", "bland", "clumsy", "lifeless", "stale", "flat",
             "tiresome", "messy"]
_FILLER = (
    "the a film movie story plot cast it is was this that and but with of its director actors scenes "
    "script ending music pace feels seems quite rather very often sometimes"
).split()


def generate_synthetic(num: int, seed: int) -> Split:
    """Sentences of filler words with a majority of sentiment words of their label's polarity."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(num):
        label = rng.randint(0, 1)
        same, other = (_POSITIVE, _NEGATIVE) if label else (_NEGATIVE, _POSITIVE)
        words = rng.choices(_FILLER, k=rng.randint(4, 16))
        cues = rng.choices(same, k=rng.randint(2, 3)) + rng.choices(other, k=rng.randint(0, 1))
        for cue in cues:
            words.insert(rng.randint(0, len(words)), cue)
        texts.append(" ".join(words))
        labels.append(label)
    return Split(texts, labels)


def load_synthetic(cfg: DictConfig, task: Task) -> dict[str, Split]:
    return {
        "train": generate_synthetic(cfg.num_train, cfg.data_seed),
        "validation": generate_synthetic(cfg.num_val, cfg.data_seed + 1_000_003),
    }


def load_splits(cfg: DictConfig) -> dict[str, Split]:
    """The task's training split and its validation splits: generated, from ``data.dir``, or from the hub."""
    task = task_of(cfg)
    source = load_synthetic if cfg.name == "synthetic" else load_local if cfg.get("dir") else load_hub
    splits = source(cfg, task)
    for split in splits:
        limit = cfg.train_limit if split == "train" else cfg.val_limit
        if limit is not None:
            part = splits[split]
            splits[split] = Split(part.texts[:limit], part.labels[:limit], part.pairs and part.pairs[:limit])
        if not splits[split].texts:
            raise DataError(f"data={cfg.name}: the {split} split is empty")
    return splits


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
