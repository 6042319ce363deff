"""Runs of a sweep that another live process holds: said, waited for, and never left without a record.

Two sweeps into one directory train each run once between them: a run's claim on its folder decides
(:mod:`crisp.core.claim`), and the sweep that finds a run claimed skips it. Before its report, a sweep
waits for the runs it skipped that way, since a report without them, and an exit code 0, would say
nothing of runs it was asked for. It names each run and the process that holds it (host, pid, SLURM
task) and waits until that process lets go. A run whose holder ended without leaving a results.json
for it (a sweep killed with ``kill -9``, say) is recorded failed here, so the sweep exits non-zero and
the same command trains it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from hydra.core.utils import JobReturn

from crisp.core import results
from crisp.core.claim import Holder, RunLock
from crisp.core.lifecycle import SKIPPED
from crisp.sweep.jobs import Job, record_failure
from crisp.sweep.pool import SweepInterrupted, signals_raise

log = logging.getLogger("crisp")


def holder(job: Job) -> Holder | None:
    """Who holds the job's run now: a live process (or one on another host, which cannot be asked), or None."""
    RunLock.clear_stale(job.output_dir)  # a claim whose process is gone holds nothing
    return RunLock(job.output_dir).holder()


def describe(who: Holder) -> str:
    task = f", SLURM task {who.task}" if who.task != "-" else ""
    return f"process {who.pid} on {who.host}{task}"


def settle(jobs: Sequence[Job], returns: Sequence[JobReturn], poll_s: float = 2.0) -> None:
    """Wait for the runs this sweep skipped because another process held them; record failed those it left
    without a result (see the module)."""
    skipped: dict[str, Job] = {}
    for job, ret in zip(jobs, returns, strict=True):
        value = ret.return_value
        if isinstance(value, dict) and value.get("status") == SKIPPED and \
                not results.is_completed(job.output_dir, job.record["run_key"]):
            skipped.setdefault(str(job.output_dir), job)
    held = {name: (job, who) for name, job in skipped.items() if (who := holder(job)) is not None}
    if held:
        log.warning("%d run(s) of this sweep are being trained by another process; waiting for them before the "
                    "report (Ctrl-C stops waiting):", len(held))
        for job, who in held.values():
            log.warning("  %s: %s", job.record["output_dir"], describe(who))
        _wait(held, poll_s)
    for job in skipped.values():
        found = results.read(job.output_dir) or {}
        if found.get("run_key") != job.record["run_key"] or found.get("status") not in (results.COMPLETED,
                                                                                         results.FAILED):
            why = ("another process held this run while this sweep ran and ended without recording it: run the "
                   "same command again to train it")
            record_failure(job, "NotTrained", why)
            log.error("%s failed: NotTrained: %s", job.record["output_dir"], why)


def _wait(held: dict[str, tuple[Job, Holder]], poll_s: float) -> None:
    try:
        with signals_raise():
            while held:
                time.sleep(poll_s)
                for name, (job, who) in list(held.items()):
                    if holder(job) is None:
                        del held[name]
                        found = (results.read(job.output_dir) or {}).get("status", "no result")
                        log.info("%s: %s let go of it (%s)", job.record["output_dir"], describe(who), found)
    except SweepInterrupted as stop:
        names = ", ".join(job.record["output_dir"] for job, _ in held.values())
        sweep_dir = next(iter(held.values()))[0].sweep_dir
        log.error("crisp: stopped waiting (%s): %s still held by another process; run the same command with "
                  "hydra.sweep.dir=%s once it is done for the whole report", stop, names, sweep_dir)
        raise SystemExit(143 if str(stop) == "SIGTERM" else 130) from None
