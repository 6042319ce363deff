"""SLURM's view of a sweep's tasks: their states, how they exited, and the run claims they still hold.

``squeue`` answers while slurmctld remembers a task (``MinJobAge`` after it ends, 300 s by default)
and works whether or not the cluster keeps accounting; ``sacct`` is asked only about tasks that
slurmctld has forgotten, where accounting is on.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from pathlib import Path
from typing import Any

from crisp.core.claim import RunLock
from crisp.sweep.jobs import Job

log = logging.getLogger("crisp")

# squeue states of a task that may still run its jobs; every other state is final
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
                    "REQUEUE_HOLD", "SPECIAL_EXIT", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
                    "RESV_DEL_HOLD"})
# active states in which a task waits for a person (scontrol release, or scancel)
HELD = frozenset({"REQUEUE_HOLD", "SPECIAL_EXIT", "RESV_DEL_HOLD"})

Entry = tuple[str, int, str, str]  # (state, restarts, node, exit code)


class Queue:
    """The array's tasks as SLURM reports them: ``squeue`` while slurmctld remembers a task (``MinJobAge``
    after it ends, 300 s by default), ``sacct`` after that where accounting is on.

    Whether accounting is on is found once and, if it is off, said once (``sacct`` then only answers
    "accounting storage is disabled"; submitit would warn about it at every poll).
    """

    FIELDS = "JobArrayID:|,State:|,RestartCnt:|,NodeList:|,exit_code:|"

    def __init__(self, array: str):
        self.array = array
        self.ok = False  # the last squeue call answered
        self._failing = False
        self._accounting: bool | None = None

    def poll(self) -> dict[str, Entry]:
        """``{task id: (state, restarts, node, exit code)}`` for the tasks squeue lists."""
        proc = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", self.array, "-O", self.FIELDS],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            if not self._failing:
                log.warning("squeue failed (%s); asking again every poll", proc.stderr.strip() or proc.returncode)
            self._failing, self.ok = True, False
            return {}
        if self._failing:
            log.info("squeue answers again")
        self._failing, self.ok = False, True
        seen = {}
        for line in proc.stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 5 and parts[0].strip():
                task, state, restarts, node, exit_code = (p.strip() for p in parts[:5])
                seen[task] = (state.split()[0], int(restarts or 0), node, exit_code)
        return seen

    def forgotten(self, task_id: str, restarts: int, node: str, result: Path) -> Entry:
        """How a task that squeue no longer lists ended: from sacct, else from the result file it left."""
        if self.accounting():
            proc = subprocess.run(["sacct", "-n", "-X", "-P", "-j", task_id, "-o", "JobID,State,NodeList,ExitCode"],
                                  capture_output=True, text=True, timeout=60)
            for line in proc.stdout.splitlines():
                job_id, state, sacct_node, exit_code = (line.split("|") + ["", "", "", ""])[:4]
                if job_id == task_id and state.split():
                    return state.split()[0], restarts, sacct_node or node, exit_code  # "CANCELLED by 0"
        if result.is_file():
            return "COMPLETED", restarts, node, "0"
        return "UNKNOWN", restarts, node, "?"

    def accounting(self) -> bool:
        if self._accounting is None:
            try:
                proc = subprocess.run(["sacct", "-n", "-X", "-j", self.array, "-o", "JobID"], capture_output=True,
                                      text=True, timeout=60)
                said, self._accounting = proc.stderr.strip(), proc.returncode == 0
            except (OSError, subprocess.TimeoutExpired) as err:
                said, self._accounting = str(err), False
            if not self._accounting:
                log.info("SLURM accounting is off here (sacct: %s): crisp follows the array with squeue, which "
                         "forgets a task MinJobAge after it ends", said or "no answer")
        return self._accounting


def describe_exit(status: str, params: dict[str, Any]) -> str:
    """squeue's exit_code (a wait status: exit code << 8, or the signal that ended the process) in words."""
    try:
        code = int(status)
    except ValueError:
        return f"exited ({status})"
    if code & 0x7F:
        signum = code & 0x7F
    elif code >> 8 > 128:  # a shell's exit code for a child killed by a signal
        signum = (code >> 8) - 128
    else:
        return f"exited with code {code >> 8}"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if name == "SIGUSR2":  # SLURM's warning before the time limit, sent before submitit could catch it
        return (f"was killed by SIGUSR2, which SLURM sends signal_delay_s={params.get('signal_delay_s')} s before "
                f"the time limit (timeout_min={params['timeout_min']}), before submitit could handle it")
    return f"was killed by {name}"


# --- run-directory claims held by SLURM tasks ----------------------------------------------------


def _claim(job: Job) -> tuple[Path, str] | None:
    """The SLURM task (``<job>_<task>``) that holds the run's ``.crisp.lock``, if a SLURM task holds it."""
    lock = RunLock(job.output_dir)
    holder = lock.holder()
    return (lock.path, holder.task) if holder is not None and holder.task != "-" else None


def release_claim(job: Job, slurm_id: str) -> None:
    """Remove the claim left by ``slurm_id`` (a task SLURM has ended, maybe on another host)."""
    claim = _claim(job)
    if claim and claim[1] == (slurm_id if "_" in slurm_id else f"{slurm_id}_0"):
        claim[0].unlink(missing_ok=True)


def free_dead_claims(jobs: list[Job]) -> None:
    """Before submitting: remove claims held by SLURM tasks that SLURM no longer runs (an earlier sweep's
    task that was killed on another host, say), so that re-running the command trains those runs again."""
    claims = [(job, *claim) for job in jobs if (claim := _claim(job))]
    alive: set[str] = set()
    for array in sorted({task.split("_")[0] for _, _, task in claims}):
        proc = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i|%T"], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            return  # cannot tell: leave the claims (those runs are skipped as busy)
        for line in proc.stdout.split():
            task, _, state = line.partition("|")
            if state in ACTIVE:
                alive.add(task if "_" in task else f"{task}_0")
    for job, path, task in claims:
        if task in alive:
            log.info("%s: SLURM task %s is still running it; this sweep skips it", job.name, task)
        else:
            path.unlink(missing_ok=True)
            log.info("%s: removed the claim of SLURM task %s, which no longer runs", job.name, task)
