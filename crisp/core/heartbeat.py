"""A worker's sign of life: the file named by ``$CRISP_HEARTBEAT``, touched as training makes progress.

crisp's process launchers (parallel, lockstep) give every worker a heartbeat file and end a worker
whose file has not been touched for ``stall_timeout_s``: a hung CUDA call, a deadlock or a stopped
process cannot hang a sweep forever. The training loops call :func:`beat` after every batch; it
touches the file at most every :data:`EVERY_S` seconds, and does nothing outside such a worker.

A beat may carry where training is (:func:`report`: runs, epoch, step, samples/s, ETA): the file then holds
it as JSON, which the sweep reads (:func:`read`) to show one progress line per worker.

The same beat lets a launcher stop training from a signal handler (:func:`stop_with`): an exception
raised inside a handler is lost where the handler happened to interrupt a ``logging`` call (logging
swallows errors while it emits), so the error is also kept here, and the next beat raises it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

ENV = "CRISP_HEARTBEAT"
EVERY_S = 2.0
_last = 0.0
_pending: BaseException | None = None


def stop_with(error: BaseException) -> None:
    """Training raises ``error`` at its next beat (from a signal handler, which may raise it itself too)."""
    global _pending
    _pending = error


def beat(force: bool = False) -> None:
    global _last, _pending
    if _pending is not None:
        error, _pending = _pending, None
        raise error
    path = os.environ.get(ENV)
    if not path:
        return
    now = time.monotonic()
    if force or now - _last >= EVERY_S:
        _last = now
        try:
            os.utime(path)
        except FileNotFoundError:
            open(path, "a").close()


def age_s(path: str | os.PathLike) -> float:
    """Seconds since ``path`` was last touched (infinite if it does not exist)."""
    try:
        return time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return float("inf")


def report(status: dict[str, Any], force: bool = False) -> None:
    """A beat that also says where training is: ``status`` written into the heartbeat file as JSON (at most
    every :data:`EVERY_S` seconds, through a temp file and a rename: a reader never sees half of it)."""
    global _last
    path = os.environ.get(ENV)
    if not path:
        beat(force)
        return
    now = time.monotonic()
    if not force and now - _last < EVERY_S:
        beat()  # raises a pending stop
        return
    beat(force=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(status, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a sign of life matters more than what it says


def read(path: str | os.PathLike) -> dict[str, Any] | None:
    """What the last :func:`report` said, or None (no report yet, or only plain beats)."""
    try:
        with open(path) as f:
            text = f.read()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None
