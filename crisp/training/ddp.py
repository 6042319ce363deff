"""Lightning DDP under Hydra.

Lightning starts ranks 1..N-1 by re-running ``sys.argv``. Inside a Hydra sweep that would start the
whole sweep again in every rank, in the sweep's unused run directory. crisp instead starts each rank
as a single run of *this job's* overrides, in this job's output directory, with no .hydra folder of
its own; rank > 0 writes no results.json and makes no W&B run (Lightning logs from rank 0 only).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path


def is_child_rank() -> bool:
    """True in the processes that Lightning's DDP launcher started for ranks other than 0."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0


def rank_command(local_rank: int) -> tuple[Sequence[str], str]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    command = [sys.executable, "-m", "crisp.run", *hydra_cfg.overrides.task]
    command += [
        "hydra.mode=RUN",  # a sweep's experiment may set MULTIRUN: a rank is one run
        f"hydra.run.dir={output_dir}",
        f"hydra.job.name=ddp_rank_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def use_crisp_rank_command() -> None:
    """Make Lightning's subprocess launcher start ranks with :func:`rank_command`."""
    from pytorch_lightning.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = rank_command
