"""SST-2 (hub, or a GLUE-format TSV folder) and generated sentiment data, as a LightningDataModule.

Sentences are tokenized once per (data, tokenizer, max length) and cached under ``~/.cache/crisp``;
batches are slices of one padded tensor, trimmed to the longest sentence in the batch (dynamic
padding), so loading costs almost nothing next to a training step.
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

from crisp.hub import load_hub_dataset

CACHE_DIR = Path(os.environ.get("CRISP_CACHE", Path.home() / ".cache" / "crisp"))


class DataError(ValueError):
    """Data that cannot be used, with what is wrong and where."""


@dataclass
class Split:
    texts: list[str]
    labels: list[int]


# ----------------------------------------------------------------------------------------------
# Sources: each returns {"train": Split, "validation": Split}


def read_glue_tsv(path: Path) -> Split:
    """A GLUE SST-2 TSV (header ``sentence<TAB>label``); every problem is reported with its line."""
    if not path.is_file():
        raise DataError(f"data.dir: missing file {path} (a GLUE SST-2 folder holds train.tsv and dev.tsv)")
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None or "sentence" not in header or "label" not in header:
            raise DataError(f"{path}: header {header!r} lacks the columns 'sentence' and 'label'")
        text_col, label_col = header.index("sentence"), header.index("label")
        texts, labels = [], []
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: expected {len(header)} tab-separated fields, got {len(row)}")
            if row[label_col] not in ("0", "1"):
                raise DataError(f"{path}:{line}: label={row[label_col]!r} is not allowed: labels must be 0 or 1")
            texts.append(row[text_col].strip())
            labels.append(int(row[label_col]))
    if not texts:
        raise DataError(f"{path}: no examples (the split is empty)")
    return Split(texts, labels)


def load_local(cfg: DictConfig) -> dict[str, Split]:
    folder = Path(cfg.dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.dir={str(cfg.dir)!r} is not a folder (it must hold GLUE SST-2 train.tsv and dev.tsv)")
    return {"train": read_glue_tsv(folder / "train.tsv"), "validation": read_glue_tsv(folder / "dev.tsv")}


def load_hub(cfg: DictConfig) -> dict[str, Split]:
    dataset = load_hub_dataset(cfg.hub_path, cfg.hub_config)
    splits = {}
    for split in ("train", "validation"):
        part = dataset[split]
        splits[split] = Split([t.strip() for t in part["sentence"]], [int(y) for y in part["label"]])
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


def load_synthetic(cfg: DictConfig) -> dict[str, Split]:
    return {
        "train": generate_synthetic(cfg.num_train, cfg.data_seed),
        "validation": generate_synthetic(cfg.num_val, cfg.data_seed + 1_000_003),
    }


SOURCES = {"sst2": load_hub, "sst2_local": load_local, "synthetic": load_synthetic}


def load_splits(cfg: DictConfig) -> dict[str, Split]:
    splits = SOURCES[cfg.name](cfg)
    for split, limit in (("train", cfg.train_limit), ("validation", cfg.val_limit)):
        if limit is not None:
            splits[split] = Split(splits[split].texts[:limit], splits[split].labels[:limit])
        if not splits[split].texts:
            raise DataError(f"data={cfg.name}: the {split} split is empty")
    return splits


# ----------------------------------------------------------------------------------------------
# Tokenization (cached) and batches


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class TokenizedSplit(torch.utils.data.Dataset):
    """One padded id tensor; ``__getitems__`` returns a whole batch trimmed to its longest sentence."""

    def __init__(self, input_ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor):
        self.input_ids, self.lengths, self.labels = input_ids, lengths, labels
        self.multiple = 1

    def pad_to_multiple_of(self, multiple: int, limit: int) -> TokenizedSplit:
        """Pad every batch to a multiple of ``multiple`` tokens (at most ``limit``): few batch shapes."""
        self.multiple = multiple
        widest = min(_round_up(self.input_ids.size(1), multiple), limit)
        if widest > self.input_ids.size(1):  # the extra columns are masked out: any id will do
            extra = self.input_ids.new_zeros(len(self.input_ids), widest - self.input_ids.size(1))
            self.input_ids = torch.cat([self.input_ids, extra], dim=1)
        return self

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices)
        width = int(self.lengths[index].max())
        if self.multiple > 1:
            width = min(_round_up(width, self.multiple), self.input_ids.size(1))
        ids = self.input_ids[index, :width]
        mask = (torch.arange(width) < self.lengths[index, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[index]}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def _fingerprint(tokenizer, split: Split, max_length: int) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(f"{max_length}\0{len(split.texts)}\0".encode())
    for text, label in zip(split.texts, split.labels, strict=True):
        h.update(f"{text}\0{label}\n".encode())
    return h.hexdigest()[:24]


def tokenize(tokenizer, split: Split, max_length: int, cache: bool = True) -> TokenizedSplit:
    path = CACHE_DIR / "tokenized" / f"{_fingerprint(tokenizer, split, max_length)}.pt"
    if cache and path.is_file():
        return TokenizedSplit(**torch.load(path))
    encoded = tokenizer(split.texts, truncation=True, max_length=max_length)["input_ids"]
    lengths = torch.tensor([len(ids) for ids in encoded])
    input_ids = torch.full((len(encoded), int(lengths.max())), tokenizer.pad_token_id, dtype=torch.long)
    # every sentence left-aligned in its row, all at once (a boolean mask fills row by row)
    input_ids[torch.arange(input_ids.size(1)) < lengths[:, None]] = torch.tensor(list(itertools.chain(*encoded)))
    tensors = {"input_ids": input_ids, "lengths": lengths, "labels": torch.tensor(split.labels)}
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


class SST2DataModule(pl.LightningDataModule):
    def __init__(self, cfg: DictConfig, tokenizer, splits: dict[str, Split], seed: int, pin_memory: bool = False,
                 pad_to_multiple_of: int = 1):
        super().__init__()
        self.cfg, self.tokenizer, self.seed, self.pin_memory = cfg, tokenizer, seed, pin_memory
        self.train = tokenize(tokenizer, splits["train"], cfg.max_length)
        self.val = tokenize(tokenizer, splits["validation"], cfg.max_length)
        if pad_to_multiple_of > 1:
            self.train.pad_to_multiple_of(pad_to_multiple_of, cfg.max_length)

    def _loader(self, dataset: TokenizedSplit, batch_size: int, shuffle: bool, generator=None) -> DataLoader:
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        return DataLoader(
            dataset,
            batch_sampler=BatchSampler(sampler, batch_size, drop_last=False),
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

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, self.cfg.eval_batch_size, shuffle=False)

    def calibration_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        return calibration_batches(self.train, self.cfg.batch_size, count, self.seed)


def calibration_batches(train: TokenizedSplit, batch_size: int, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` training batches chosen from the seed alone (for the adaptive strategy)."""
    generator = torch.Generator().manual_seed(seed + 7919)
    order = torch.randperm(len(train), generator=generator).tolist()
    starts = range(0, min(count * batch_size, len(order)), batch_size)
    return [train.__getitems__(order[start : start + batch_size]) for start in starts]
