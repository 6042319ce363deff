"""A sweep's progress on its terminal: one line per running group or worker, from their heartbeats.

Each worker's training reports where it is into its heartbeat file (:func:`crisp.core.heartbeat.report`:
runs, epoch, step of all, samples per second, time left); the worker pool reads them as it polls and
hands them here (:class:`ProgressLines`):

- on a terminal, the lines are redrawn in place at every poll (cleared before anything else is printed);
- in a log (stdout not a terminal) or under SLURM, they are plain log lines, every
  ``sweep.progress_every_s`` seconds (a line that has not changed since is not repeated).

``group0: 4 runs | epoch 2/3 | step 120/192 | 1,850 samples/s | ETA 0:14``
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from crisp.core import heartbeat

log = logging.getLogger("crisp")
DEFAULT_EVERY_S = 30.0
_every_s = DEFAULT_EVERY_S


def configure(config: Any) -> None:
    """The sweep's ``sweep.progress_every_s`` (a launcher calls it as it prepares the sweep)."""
    global _every_s
    sweep = config.get("sweep") or {}
    _every_s = float(sweep.get("progress_every_s", DEFAULT_EVERY_S) or DEFAULT_EVERY_S)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def line(label: str, status: dict[str, Any]) -> str:
    """One task's progress line (see the module)."""
    runs = status.get("runs", 1)
    return (f"{label}: {runs} run{'s' if runs != 1 else ''} | epoch {status.get('epoch')}/{status.get('epochs')} | "
            f"step {status.get('step')}/{status.get('steps')} | {status.get('samples_per_s', 0):,.0f} samples/s | "
            f"ETA {duration(status.get('eta_s'))}")


class ProgressLines:
    """Shows the running tasks' progress (see the module); ``show`` at each poll, ``clear`` before other output."""

    def __init__(self, every_s: float | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() and not os.environ.get("SLURM_JOB_ID")
        self.every_s = _every_s if every_s is None else every_s
        self._drawn = 0
        self._last = time.monotonic()
        self._said: dict[str, str] = {}

    def clear(self) -> None:
        if self.live and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # up to the block's first line, erase to the end
            self.stream.flush()
            self._drawn = 0

    def show(self, tasks: Sequence[Any]) -> None:
        """``tasks``: the pool's running tasks (their ``label`` and heartbeat file under ``files``)."""
        shown = {task.label: line(task.label, status) for task in tasks
                 if (status := heartbeat.read(task.files / "heartbeat")) is not None}
        lines = list(shown.values())
        if self.live:
            self.clear()
            if lines:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
                self._drawn = len(lines)
        elif lines and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            for label, text in shown.items():
                if self._said.get(label) != text:
                    log.info("%s", text)
            self._said = shown
