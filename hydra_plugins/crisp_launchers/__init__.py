"""crisp's Hydra launchers and sweeper (Hydra finds plugins in the ``hydra_plugins`` namespace only).

The classes are thin: the work is in :mod:`crisp.sweep`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class ComposeOnceSweeper(BasicSweeper):
    """``hydra/sweeper=crisp`` (crisp's default): Hydra's basic sweeper, except that it does not compose
    every job of a batch just to check it when the launcher composes them all itself, in the sweep's
    process, before it starts any (``composes_jobs_first``: all of crisp's launchers). A bad job then
    fails there, as early; a grid's jobs are composed once instead of twice (80 jobs: 10 s on the
    H100 host). Any other launcher is checked as Hydra checks it."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        if not getattr(self.launcher, "composes_jobs_first", False):
            super().validate_batch_is_legal(batch)


class _ProcessLauncher(Launcher):
    composes_jobs_first = True  # crisp.sweep.launch.prepare, before any worker starts

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config


class ParallelLauncher(_ProcessLauncher):
    """``hydra/launcher=parallel``: every run in its own worker process, ``n_jobs`` at once."""

    def __init__(self, n_jobs: int, stall_timeout_s: float = 600, worker_start: str = "auto") -> None:
        from crisp.sweep.pool import check_worker_start

        self.n_jobs, self.stall_timeout_s = n_jobs, stall_timeout_s
        self.worker_start = check_worker_start(worker_start)  # before Hydra writes anything

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from crisp.sweep.parallel import launch_jobs

        return launch_jobs(self, job_overrides, initial_job_idx)


class LockstepLauncher(_ProcessLauncher):
    """``hydra/launcher=lockstep``: runs that share a recipe trained as one fused model per group."""

    def __init__(self, max_runs_per_group: int | str | None = "auto", row_width: int = 64,
                 pack_workers: int | str = "auto", stall_timeout_s: float = 600, worker_start: str = "auto") -> None:
        self.max_runs_per_group, self.row_width, self.stall_timeout_s = max_runs_per_group, row_width, stall_timeout_s
        from crisp.sweep.lockstep import check_pack_workers
        from crisp.sweep.pool import check_worker_start

        self.pack_workers = check_pack_workers(pack_workers)  # before Hydra writes anything
        self.worker_start = check_worker_start(worker_start)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from crisp.sweep.lockstep import launch_jobs

        return launch_jobs(self, job_overrides, initial_job_idx)
