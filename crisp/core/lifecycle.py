"""The one lifecycle of a run, the same for a single run and for each run of a lockstep group.

:func:`attempt` takes the runs that one process is to train and, for each: claims its directory
(:class:`~crisp.core.claim.RunLock`; a run that another process holds is skipped), skips it if its
results.json already says completed with the same run_key (checked under the claim: a job that shares
the run may just have finished it), hands the rest to ``train``, and records every outcome in
results.json, written atomically: completed with what training returned, or failed with the error.
A run whose earlier results.json cannot be read is trained again, and its new results.json says why
(``retrained``).
A run that fails alone (a NaN loss in a lockstep group) is failed by ``train`` itself; anything that
``train`` raises fails every run it had not finished, and no run is left without a record.
"""

from __future__ import annotations

import errno
import logging
import shutil
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crisp.core import results
from crisp.core.claim import RunLock, RunLockBusy
from crisp.core.errors import USER_ERRORS, OutOfSpace

log = logging.getLogger("crisp")
SKIPPED = "skipped"


def failure(err: BaseException) -> dict[str, str]:
    """How results.json records an error: its type, message and traceback."""
    trace = "".join(traceback.format_exception(err)) if err.__traceback__ else ""
    return {"type": type(err).__name__, "message": str(err), "traceback": trace}


# what a run writes into its directory, at most, without trainer.save_weights: config, results, logs
RUN_BYTES = 2 * 2**20


def _free(where: Path) -> int:
    existing = next(p for p in (where, *where.parents) if p.exists())
    return shutil.disk_usage(existing).free


def out_of_space(err: OSError | None, where: Path, runs: int = 1) -> OutOfSpace:
    """A full disk as one line: which directory, how much is free, and how much the runs need."""
    return OutOfSpace(f"no space left for {runs} run(s) in {where}: {_free(where) / 2**20:.1f} MiB free there, about "
                      f"{runs * RUN_BYTES / 2**20:.0f} MiB needed (config, results.json, logs; more with "
                      "trainer.save_weights=true)")


def check_space(where: Path, runs: int = 1) -> None:
    """Before anything is written: room for ``runs`` runs in ``where``, or :class:`OutOfSpace` in one line."""
    if _free(Path(where)) < runs * RUN_BYTES:
        raise out_of_space(None, Path(where), runs)


@dataclass
class Run:
    """One run in a process: where it writes, what every results.json of it starts with, and its outcome."""

    output_dir: Path
    record: dict[str, Any]  # crisp.core.results.run_record
    started: str
    result: dict[str, Any] | None = None  # set once it is skipped, failed or completed

    @classmethod
    def of(cls, record: dict[str, Any], output_dir: Path) -> Run:
        return cls(Path(output_dir), record, results.now())

    @property
    def name(self) -> str:
        return self.record["name"]

    def complete(self, outcome: dict[str, Any]) -> dict[str, Any]:
        payload = {**self.record, "status": results.COMPLETED, "error": None, **outcome,
                   "started_at": self.started, "finished_at": results.now()}
        try:
            results.write_atomic(self.output_dir / results.FILENAME, payload)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise out_of_space(err, self.output_dir) from None
        self.result = payload
        log.info("%s: completed, results in %s", self.name, self.output_dir / results.FILENAME)
        return payload

    def fail(self, err: BaseException) -> dict[str, Any]:
        record = {**self.record, "started_at": self.started}
        try:
            self.result = results.record_failure(self.output_dir, record, failure(err))
        except OSError as unwritten:  # a full disk: the failure is said here, where its record cannot go
            self.result = {**record, "status": results.FAILED, "error": failure(err), "finished_at": results.now()}
            log.error("%s: its results.json could not be written (%s)", self.name, unwritten)
        log.error("%s failed: %s: %s", self.name, type(err).__name__, err)
        return self.result

    def retrain(self, why: str) -> None:
        """Train again a run whose earlier record cannot be read: said here and in its new results.json."""
        self.record = {**self.record, "retrained": why}
        log.warning("%s: %s: training it again", self.name, why)

    def skip(self, why: str) -> dict[str, Any]:
        self.result = {**self.record, "status": SKIPPED}
        log.info("%s: %s, skipped", self.name, why)
        return self.result


def attempt(runs: list[Run], train: Callable[[list[Run]], None]) -> list[dict[str, Any]]:
    """Claim, skip if completed, train, record: the outcome of each run, in order (see the module)."""
    with ExitStack() as claims:
        for run in runs:
            if run.result is not None:  # failed its checks before it got here
                continue
            try:
                claims.enter_context(RunLock(run.output_dir))
            except RunLockBusy as busy:
                run.skip(str(busy))
                continue
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                run.fail(out_of_space(err, run.output_dir))  # its record cannot be written either: said once
                continue
            if results.is_completed(run.output_dir, run.record["run_key"]):
                run.skip(f"already completed in {run.output_dir}")
            elif (why := results.unreadable(run.output_dir)) is not None:
                run.retrain(f"its previous {results.FILENAME} could not be read ({why})")
        todo = [run for run in runs if run.result is None]
        if todo:
            try:
                train(todo)
            except Exception as err:
                if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                    err = out_of_space(err, todo[0].output_dir)
                for run in todo:
                    if run.result is None:
                        run.fail(err)
                if not isinstance(err, USER_ERRORS):
                    log.error("%s", failure(err)["traceback"].rstrip())
            for run in todo:
                if run.result is None:  # train returned without a word about it: never leave a run unrecorded
                    run.fail(RuntimeError("training ended without completing or failing this run"))
    return [run.result for run in runs]
