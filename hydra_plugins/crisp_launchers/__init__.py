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
    """``hydra/sweeper=crisp`` (crisp's default): Hydra's basic sweeper's grid, each job composed once,
    its run directory named from what varies, and every job checked before anything is written or
    trained (:mod:`crisp.sweep.sweeper`). crisp's launchers take the composed jobs (``launch_jobs``);
    any other launcher gets the overrides. ``grids``: a union of grids (:func:`crisp.sweep.sweeper.expand`).
    Before the report, it waits for the runs that another sweep's process held (:mod:`crisp.sweep.held`)."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None,
                 grids: list[dict[str, str]] | None = None) -> None:
        super().__init__(max_batch_size, params)
        self.grids = [dict(grid) for grid in grids] if grids else None

    def checked_jobs(self, arguments: list[str]) -> tuple[list[list[list[str]]], list]:
        """The grid's batches and its jobs, each composed and checked, and room on the disk for its runs: all that
        :meth:`sweep` does before it writes anything (ConfigError or OutOfSpace on the first problem). The README's
        commands are checked with it (``tests/test_readme.py``)."""
        from pathlib import Path

        from crisp.core.lifecycle import check_space
        from crisp.sweep import sweeper

        batches = sweeper.expand(self, arguments)
        jobs = sweeper.compose_and_check(self, [job for batch in batches for job in batch], 0)
        check_space(Path(str(self.config.hydra.sweep.dir)), runs=len({job.output_dir for job in jobs}))
        return batches, jobs

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        import sys
        from pathlib import Path

        from omegaconf import OmegaConf

        from crisp.core.errors import ConfigError, OutOfSpace
        from crisp.sweep import held

        try:
            batches, jobs = self.checked_jobs(arguments)
        except (ConfigError, OutOfSpace) as err:
            print(f"crisp: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, start = [], 0
        for batch in batches:
            if hasattr(self.launcher, "launch_jobs"):
                done = self.launcher.launch_jobs(jobs[start : start + len(batch)])
            else:
                done = self.launcher.launch(batch, initial_job_idx=start)
            for ret in done:
                _ = ret.return_value  # as Hydra's sweeper: a job that raised raises here
            start += len(batch)
            returns.append(done)
        # runs that another sweep's process held were skipped: wait for them (or record them failed) before the report
        held.settle(jobs, [ret for done in returns for ret in done])
        return returns


class _ProcessLauncher(Launcher):
    """A launcher of crisp's: crisp's sweeper hands it the grid's composed jobs (:meth:`launch_jobs`);
    under another sweeper, :meth:`launch` composes and checks a batch the same way first."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from crisp.sweep import optimise, sweeper

        if optimise.optimises(self.config):  # hydra/sweeper=optuna: trials, each returning its objective
            jobs = sweeper.compose_and_check(self, optimise.trial_dirs(job_overrides, initial_job_idx),
                                             initial_job_idx)
            return optimise.with_objectives(jobs, self.launch_jobs(jobs))
        return self.launch_jobs(sweeper.compose_and_check(self, sweeper.with_run_dirs(job_overrides), initial_job_idx))


class ParallelLauncher(_ProcessLauncher):
    """``hydra/launcher=parallel``: every run in its own worker process, ``n_jobs`` at once."""

    def __init__(self, **settings) -> None:
        from crisp.sweep.options import ParallelOptions, build

        self.options = build(ParallelOptions, settings)  # checked before Hydra writes anything

    def launch_jobs(self, jobs) -> Sequence[JobReturn]:
        from crisp.sweep.parallel import launch_jobs

        return launch_jobs(self, jobs)


class LockstepLauncher(_ProcessLauncher):
    """``hydra/launcher=lockstep``: runs that share a recipe trained as one fused model per group."""

    def __init__(self, **settings) -> None:
        from crisp.sweep.options import LockstepOptions, build

        self.options = build(LockstepOptions, settings)  # checked before Hydra writes anything

    def launch_jobs(self, jobs) -> Sequence[JobReturn]:
        from crisp.sweep.lockstep_launcher import launch_jobs

        return launch_jobs(self, jobs)


class AutoLauncher(LockstepLauncher):
    """``hydra/launcher=auto`` (crisp's default): the fast path by itself. Jobs that share a recipe train
    in lockstep, one fused model per group; a run alone, or one that lockstep cannot train (DDP,
    torch.compile, an encoder of no lockstep family), in a worker process of its own."""

    def launch_jobs(self, jobs) -> Sequence[JobReturn]:
        from crisp.sweep.lockstep_launcher import launch_jobs

        return launch_jobs(self, jobs, alone="process")
