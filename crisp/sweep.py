"""Sweep plumbing: one process per run directory at a time, and the report when a sweep ends."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from crisp import results

log = logging.getLogger("crisp")


class RunLockBusy(RuntimeError):
    pass


def _scheduler_task() -> str:
    """The SLURM task this process runs as ('-' outside SLURM): a requeued task keeps it."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return "-"
    return f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"


class RunLock:
    """An exclusive claim on a run directory (``.crisp.lock``: host and pid).

    Two jobs of one sweep can map to the same run (the dense run is shared by every strategy); the
    second finds the claim and skips. A claim left by a killed process on this host is taken over.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".crisp.lock"
        self.token = f"{socket.gethostname()} {os.getpid()} {_scheduler_task()}"

    def _stale(self) -> bool:
        try:
            host, pid, task = self.path.read_text().split()
        except (OSError, ValueError):
            return True
        if task != "-" and task == _scheduler_task():
            return True  # we are the requeued SLURM task that left it when it was preempted
        if host != socket.gethostname():
            return False  # another machine's claim: cannot tell, respect it
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return int(pid) == os.getpid()  # our own leftover (a crash in this worker) is stale too

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale():
                    raise RunLockBusy(f"another process is running it ({self.path.read_text().strip()})") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.token)
            return self
        raise RunLockBusy(f"could not claim {self.path}")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


class SweepReport(Callback):
    """Says where a sweep lives and how to resume it; writes its report when it ends (failures included)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        log.info("sweep directory: %s (to resume, run the same command with hydra.sweep.dir=%s)", sweep_dir, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = [results.read(p) or {} for p in results.find_all(sweep_dir)]
        failed = sorted(r.get("name", "?") for r in records if r.get("status") != results.COMPLETED)
        if config.report.after_sweep and records:
            from crisp.report import format_table, write_report

            summary = write_report([sweep_dir], log_wandb=_wandb_target(config))
            print(format_table(summary))
            log.info("report: %s (table, plot: report.png, numbers: report.csv)", sweep_dir / "report.md")
        if failed:
            raise SystemExit(f"crisp: {len(failed)} run(s) failed: {', '.join(failed)} (see {sweep_dir}/report.md)")


def _wandb_target(config: DictConfig) -> dict[str, Any] | None:
    if config.logger.name != "wandb":
        return None
    from crisp.loggers import wandb_mode

    mode, _ = wandb_mode(config.logger.mode)
    return {"project": config.logger.project, "entity": config.logger.entity, "mode": mode,
            "group": Path(config.hydra.sweep.dir).name, "dir": str(config.hydra.sweep.dir)}
