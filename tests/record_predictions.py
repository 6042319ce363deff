"""``python -m crisp.run``, saving every validation split's predictions: for tests that compare them.

Each call of :func:`crisp.training.tasks.metrics` (one per run, validation split and epoch, for a run alone
and for each run of a lockstep group) also saves the predictions and targets it was given, with the metrics
it returned, to ``$CRISP_TEST_PREDICTIONS/<pid>-<n>.pt``. A lockstep worker sees it only when it is forked
from the sweep (``hydra.launcher.worker_start=fork``).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch

from crisp.training import tasks


def main() -> None:
    out = Path(os.environ["CRISP_TEST_PREDICTIONS"])
    out.mkdir(parents=True, exist_ok=True)
    metrics, calls = tasks.metrics, itertools.count()

    def saving(task, preds, target, suffix=""):
        values = metrics(task, preds, target, suffix)
        torch.save({"preds": preds.detach().cpu(), "target": target.detach().cpu(), "values": values},
                   out / f"{os.getpid()}-{next(calls)}.pt")
        return values

    tasks.metrics = saving
    from crisp.run import main as run

    run()


if __name__ == "__main__":
    main()
