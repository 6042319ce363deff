"""``hydra/launcher=slurm``: Hydra's submitit SLURM launcher, with results collected run by run.

The class only changes how jobs are launched and followed (:mod:`crisp.sweep.slurm`); its
parameters are submitit's (``conf/hydra/launcher/slurm.yaml``) plus ``poll_s``, registered here as
the structured config ``crisp_slurm`` so that a mistyped key or a wrong type fails at once.
"""

# no `from __future__ import annotations`: Hydra's plugin scanner runs this module before it is in
# sys.modules, where dataclasses look up string annotations
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import config as submitit_config
from hydra_plugins.hydra_submitit_launcher import submitit_launcher


@dataclass
class SlurmArrayConf(submitit_config.SlurmQueueConf):
    _target_: str = "hydra_plugins.crisp_launchers.slurm.SlurmArrayLauncher"
    # seconds between two looks at the array's tasks (one squeue call for the whole array)
    poll_s: float = 10.0


ConfigStore.instance().store(group="hydra/launcher", name="crisp_slurm", node=SlurmArrayConf, provider="crisp")


class SlurmArrayLauncher(submitit_launcher.SlurmLauncher):
    """One SLURM job array per sweep; a task that ends without its results is recorded failed, not raised."""

    def __init__(self, poll_s: float = 10.0, **params: Any) -> None:
        if not poll_s > 0:
            raise ValueError(f"hydra.launcher.poll_s={poll_s} is not allowed: it must be a number of seconds > 0")
        super().__init__(**params)
        self.poll_s = float(poll_s)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from crisp.sweep.slurm import launch_jobs

        return launch_jobs(self, job_overrides, initial_job_idx)
