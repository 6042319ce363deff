"""crisp's launchers under a sweeper that optimises (``hydra/sweeper=optuna``): trials, objectives, the best.

Hydra's Optuna sweeper asks a launcher for a batch of trials at a time (``launch``), each a set of
overrides. crisp's launchers put each trial in a run directory of its own, ``trial<N>/<run name>`` (a trial's
values may repeat an earlier trial's name: its learning rate is in no name), hand back each run's record as
its objective (:class:`crisp.core.objective.RunResult`: a run skipped because it had completed counts with
the numbers in its results.json), and the sweep's end names the best trial (:func:`best_trial`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn
from omegaconf import DictConfig

from crisp.core import results
from crisp.core.objective import objective_of, run_result
from crisp.sweep.jobs import Job, task_overrides
from crisp.sweep.sweeper import RUN_NAME

# the sweepers whose jobs form a grid (crisp's and Hydra's basic one): their runs are named by what varies
GRID_SWEEPERS = ("ComposeOnceSweeper", "BasicSweeper")


def optimises(config: DictConfig) -> bool:
    """Whether the sweep's sweeper is one that optimises (not a grid)."""
    target = str(config.hydra.sweeper.get("_target_", ""))
    return bool(target) and not target.endswith(GRID_SWEEPERS)


def trial_dirs(job_overrides: Sequence[Sequence[str]], first: int) -> list[list[str]]:
    """Each trial's overrides with its run directory ``trial<N>/<run name>`` (N: its job number)."""
    named = ["name" in {o.split("=", 1)[0].lstrip("+~") for o in job} for job in job_overrides]
    return [[*job, f"hydra.sweep.subdir='trial{first + k}/{RUN_NAME if by_name else '${name}'}'"]
            for k, (job, by_name) in enumerate(zip(job_overrides, named, strict=True))]


def with_objectives(jobs: Sequence[Job], returns: Sequence[JobReturn]) -> list[JobReturn]:
    """The launcher's returns, each value the run's record with its objective as a float."""
    for job, ret in zip(jobs, returns, strict=True):
        if isinstance(ret.return_value, dict):
            ret.return_value = run_result(ret.return_value, job.output_dir, str(job.config.get("objective", "final")))
    return list(returns)


def best_trial(config: DictConfig, sweep_dir: Path) -> str | None:
    """One line naming the sweep's best run by its objective: its folder, value and overrides."""
    which = str(config.get("objective", "final"))
    scored = []
    for path in results.find_all(sweep_dir):
        record = results.read(path) or {}
        value = objective_of(record, which)
        if value == value:  # not NaN
            scored.append((value, path.parent, record))
    if not scored:
        return None
    value, folder, record = max(scored, key=lambda s: s[0])
    shown = " ".join(task_overrides(record.get("overrides") or []))
    return (f"best trial: {folder.relative_to(sweep_dir)} ({shown}): {record.get('metric', 'val_acc')} "
            f"{value:.4f} ({which} epoch) of {len(scored)} completed")
