"""What a run hands to a sweeper that optimises (``hydra/sweeper=optuna``): one float, its ``objective``.

crisp's launchers and sweeper read a run's whole record (results.json's fields) from the value a job
returns; a sweeper that optimises needs a number (Hydra's Optuna sweeper calls ``float()`` on it). A
:class:`RunResult` is both: the record, and as a float the run's objective, the task's primary metric at
the final epoch (``objective=final``, the default) or at its best epoch (``objective=best``). A run that
failed is NaN, which Optuna records as a failed trial.
"""

from __future__ import annotations

import math
from typing import Any

from crisp.core.results import COMPLETED


def objective_of(record: dict[str, Any], which: str = "final") -> float:
    """The run's objective (see the module); NaN when it did not complete."""
    if record.get("status") not in (COMPLETED, "skipped"):
        return math.nan
    metric = record.get("metric") or "val_acc"
    value = (record.get(which) or {}).get(metric)
    return float(value) if isinstance(value, int | float) else math.nan


class RunResult(dict):
    """A run's record that is also its objective as a float (see the module)."""

    def __init__(self, record: dict[str, Any], objective: float):
        super().__init__(record)
        self.objective = objective

    def __float__(self) -> float:
        return self.objective

    def __reduce__(self):  # pickled (to and from worker processes) with its objective
        return (RunResult, (dict(self), self.objective))


def run_result(record: dict[str, Any], run_dir, which: str = "final") -> RunResult:
    """``record`` (what a job returned) with the objective of the run's results.json in ``run_dir``: a run that
    was skipped because it had completed counts with the numbers it completed with."""
    from crisp.core import results

    found = results.read(run_dir)
    same = found is not None and found.get("run_key") == record.get("run_key")
    return RunResult(record, objective_of(found if same else record, which))
