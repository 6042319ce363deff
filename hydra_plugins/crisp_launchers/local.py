"""``hydra/launcher=local``: Hydra's submitit launcher in local mode, with its processes ended with the sweep.

The class only changes how jobs are launched and followed (:mod:`crisp.sweep.local`); its settings are
submitit's (``conf/hydra/launcher/local.yaml``), checked before anything starts (:mod:`crisp.sweep.options`).
"""

# no `from __future__ import annotations`: Hydra's plugin scanner runs this module before it is in sys.modules
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher


class LocalLauncher(submitit_launcher.LocalLauncher):
    """Every run in a process of its own on this machine; the processes never outlive the sweep."""

    def __init__(self, **params: Any) -> None:
        from crisp.sweep.options import LocalOptions, build

        self.options = build(LocalOptions, params, others_allowed=True)  # before anything is written
        super().__init__(**params)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from crisp.sweep import sweeper

        return self.launch_jobs(sweeper.compose_and_check(self, sweeper.with_run_dirs(job_overrides), initial_job_idx))

    def launch_jobs(self, jobs) -> Sequence[JobReturn]:
        from crisp.sweep.local import launch_jobs

        return launch_jobs(self, jobs)
