"""``hydra/launcher=slurm`` and ``slurm_lockstep``: Hydra's submitit SLURM launcher, with results collected
run by run.

The classes only change how jobs are launched and followed (:mod:`crisp.sweep.slurm`,
:mod:`crisp.sweep.slurm_lockstep`); their parameters are submitit's (``conf/hydra/launcher/slurm.yaml``)
plus ``poll_s``, and for lockstep groups those of ``hydra/launcher=lockstep``, registered here as the
structured configs ``crisp_slurm`` and ``crisp_slurm_lockstep`` so that a mistyped key or a wrong type
fails at once (their values, and the one default of each, are in the yamls); the values are checked when
the launcher is built (:mod:`crisp.sweep.options`).
"""

# no `from __future__ import annotations`: Hydra's plugin scanner runs this module before it is in
# sys.modules, where dataclasses look up string annotations
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import config as submitit_config
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import MISSING


@dataclass
class SlurmArrayConf(submitit_config.SlurmQueueConf):
    _target_: str = "hydra_plugins.crisp_launchers.slurm.SlurmArrayLauncher"
    # seconds between two looks at the array's tasks (one squeue call for the whole array); slurm.yaml sets it
    poll_s: float = MISSING


@dataclass
class SlurmLockstepConf(SlurmArrayConf):
    _target_: str = "hydra_plugins.crisp_launchers.slurm.SlurmLockstepLauncher"
    # as hydra/launcher=lockstep; slurm_lockstep.yaml sets them (types here, the one default there)
    max_runs_per_group: Any = MISSING
    row_width: int = MISSING
    pack_workers: Any = MISSING


ConfigStore.instance().store(group="hydra/launcher", name="crisp_slurm", node=SlurmArrayConf, provider="crisp")
# merged over slurm.yaml (slurm_lockstep.yaml): typed as SlurmLockstepConf, so lockstep's keys are checked too,
# with slurm's settings left MISSING, which a merge does not write over: slurm.yaml's values stay
ConfigStore.instance().store(
    group="hydra/launcher", name="crisp_slurm_lockstep", provider="crisp",
    node=SlurmLockstepConf(**{f.name: MISSING for f in fields(SlurmArrayConf) if f.name != "_target_"}))


class SlurmArrayLauncher(submitit_launcher.SlurmLauncher):
    """One SLURM job array per sweep; a task that ends without its results is recorded failed, not raised."""

    OPTIONS = "SlurmOptions"  # its settings that crisp reads or checks (crisp.sweep.options)

    def __init__(self, **params: Any) -> None:
        from crisp.sweep import options

        kind = getattr(options, self.OPTIONS)
        self.options = options.build(kind, params, others_allowed=True)  # before anything is submitted
        super().__init__(**options.submitit_params(kind, params))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from crisp.sweep import sweeper

        return self.launch_jobs(sweeper.compose_and_check(self, sweeper.with_run_dirs(job_overrides), initial_job_idx))

    def launch_jobs(self, jobs) -> Sequence[JobReturn]:
        from crisp.sweep.slurm import launch_jobs

        return launch_jobs(self, jobs)


class SlurmLockstepLauncher(SlurmArrayLauncher):
    """One SLURM job array per sweep whose tasks are lockstep groups: each trains its runs as one fused model."""

    OPTIONS = "SlurmLockstepOptions"

    def launch_jobs(self, jobs) -> Sequence[JobReturn]:
        from crisp.sweep.slurm_lockstep import launch_jobs

        return launch_jobs(self, jobs)
