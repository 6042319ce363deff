"""One process per run directory at a time: a run's claim on its directory (``.crisp.lock``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import NamedTuple


class RunLockBusy(RuntimeError):
    pass


def _scheduler_task() -> str:
    """The SLURM task this process runs as ('-' outside SLURM): a requeued task keeps it."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return "-"
    return f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"


class Holder(NamedTuple):
    """Who holds a run's claim, as ``.crisp.lock`` says."""

    host: str
    pid: int
    task: str  # the SLURM task (``<job>_<task>``), or "-" outside SLURM


class RunLock:
    """An exclusive claim on a run directory (``.crisp.lock``: host, pid and SLURM task).

    Two jobs of one sweep can map to the same run (the dense run is shared by every strategy); the
    second finds the claim and skips. A claim left by a killed process on this host is taken over.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".crisp.lock"
        self.token = f"{socket.gethostname()} {os.getpid()} {_scheduler_task()}"

    def holder(self) -> Holder | None:
        """The claim's holder; None when there is no claim, or none that can be read (a half-written file)."""
        try:
            host, pid, task = self.path.read_text().split()
            return Holder(host, int(pid), task)
        except (OSError, ValueError):
            return None

    def _stale(self) -> bool:
        holder = self.holder()
        if holder is None:
            return True
        if holder.task != "-" and holder.task == _scheduler_task():
            return True  # we are the requeued SLURM task that left it when it was preempted
        if holder.host != socket.gethostname():
            return False  # another machine's claim: cannot tell, respect it
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return holder.pid == os.getpid()  # our own leftover (a crash in this worker) is stale too

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

    @classmethod
    def clear_stale(cls, run_dir: Path) -> None:
        """Remove a claim whose process is gone (a launcher tidying up after a worker it ended)."""
        lock = cls(run_dir)
        if lock.path.exists() and lock._stale():
            lock.path.unlink(missing_ok=True)
