"""The end of a worker's or array task's log: what a failed run's record and the sweep's terminal show of it."""

from __future__ import annotations

import os
from pathlib import Path


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of ``path`` (read from its last 16 KiB: a log may be large), or "" if unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
