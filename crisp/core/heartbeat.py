"""A worker's sign of life: the file named by ``$CRISP_HEARTBEAT``, touched as training makes progress.

crisp's process launchers (parallel, lockstep) give every worker a heartbeat file and end a worker
whose file has not been touched for ``stall_timeout_s``: a hung CUDA call, a deadlock or a stopped
process cannot hang a sweep forever. The training loops call :func:`beat` after every batch; it
touches the file at most every :data:`EVERY_S` seconds, and does nothing outside such a worker.
"""

from __future__ import annotations

import os
import time

ENV = "CRISP_HEARTBEAT"
EVERY_S = 2.0
_last = 0.0


def beat(force: bool = False) -> None:
    global _last
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
