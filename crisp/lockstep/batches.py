"""A lockstep group's batches: each run's own batch order, every step packed into one batch.

Each run keeps exactly the sampler it would have alone (a ``RandomSampler`` over its training set
with a generator seeded by its seed, advanced once per epoch), so run r sees the same batches in the
same order as when it trains by itself. A step draws the next batch of every active run and packs
them together (:mod:`crisp.lockstep.packing`); runs that share data and seed share a layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from crisp.lockstep.packing import pack
from crisp.training.data import ResumableBatches, TokenizedSplit, loader_worker_init


class GroupSplits(Dataset):
    """One split per run; ``__getitems__`` takes [(run, indices), ...] and returns a packed batch."""

    def __init__(self, splits: Sequence[TokenizedSplit], width: int):
        self.splits, self.width = list(splits), width

    def __len__(self) -> int:
        return len(self.splits[0])

    def __getitems__(self, items: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        return pack([(self.splits[run], indices) for run, indices in items], self.width)


class GroupSampler:
    """Yields, per step, every active run's next batch of indices from that run's own sampler."""

    def __init__(self, samplers: Sequence[BatchSampler], active: list[int]):
        self.samplers, self.active = list(samplers), active  # ``active`` is shared: runs may leave
        self._skip = 0

    def __len__(self) -> int:
        return len(self.samplers[0])

    def resume_at(self, epoch: int, batches: int, per_epoch: int) -> None:
        """The next iteration is the ``epoch``-th, less its first ``batches`` (each run's sampler resumes there)."""
        for run in self.active:
            self.samplers[run].resume_at(epoch, batches, per_epoch)
        self._skip = batches

    def __iter__(self) -> Iterator[list[tuple[int, list[int]]]]:
        runs = list(self.active)  # fixed for the epoch: runs leave a group between epochs
        iterators = [iter(self.samplers[run]) for run in runs]
        skip, self._skip = self._skip, 0
        for _ in range(len(self) - skip):
            yield [(run, next(it)) for run, it in zip(runs, iterators, strict=True)]


def _identity(batch):
    return batch


class GroupDataModule(pl.LightningDataModule):
    """The group's training batches (each run's own order) and each validation split of the task, packed."""

    def __init__(self, train: Sequence[TokenizedSplit], vals: Sequence[Sequence[TokenizedSplit]], seeds: Sequence[int],
                 batch_size: int, eval_batch_size: int, width: int, pin_memory: bool = False,
                 workers: int = 0):
        super().__init__()
        for kind, splits in (("train", train), *(("validation", runs) for runs in vals)):
            if len({len(s) for s in splits}) > 1:
                raise ValueError(f"runs trained in lockstep need equal-sized splits: {kind} sizes "
                                 f"{sorted({len(s) for s in splits})}")
        self.train, self.vals = GroupSplits(train, width), [GroupSplits(runs, width) for runs in vals]
        self.active = list(range(len(seeds)))
        # each run's own sampler, as its DataLoader would make it alone (crisp.training.data.TaskDataModule)
        self.train_samplers = [ResumableBatches(RandomSampler(s, generator=torch.Generator().manual_seed(seed)),
                                                batch_size, seed) for s, seed in zip(train, seeds, strict=True)]
        self.val_samplers = [[BatchSampler(SequentialSampler(s), eval_batch_size, drop_last=False) for s in runs]
                             for runs in vals]
        self.pin_memory, self.workers = pin_memory, workers
        self._resume: dict | None = None

    def state_dict(self) -> dict:
        """Where training is in the runs' batch orders (saved with a checkpoint: crisp.lockstep.checkpoints)."""
        from crisp.training.checkpoints import position

        return position(self.trainer)

    def load_state_dict(self, state: dict) -> None:
        self._resume = state

    def keep_runs(self, keep: list[int]) -> None:
        """Only these runs (indices among the active ones) go on."""
        self.active[:] = [self.active[i] for i in keep]

    def _loader(self, dataset: GroupSplits, samplers: list[BatchSampler]) -> DataLoader:
        # packing a step of R runs takes milliseconds of Python: worker processes do it while the
        # GPU trains (the samplers stay here, so runs that leave are seen at the next epoch)
        return DataLoader(dataset, batch_sampler=GroupSampler(samplers, self.active), collate_fn=_identity,
                          pin_memory=self.pin_memory, num_workers=self.workers,
                          persistent_workers=self.workers > 0, prefetch_factor=4 if self.workers else None,
                          worker_init_fn=loader_worker_init)

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train, self.train_samplers)
        if self._resume is not None:
            loader.batch_sampler.resume_at(self._resume["epoch"], self._resume["batches"], self._resume["per_epoch"])
            self._resume = None
        return loader

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(val, samplers) for val, samplers in zip(self.vals, self.val_samplers, strict=True)]
