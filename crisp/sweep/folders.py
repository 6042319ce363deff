"""Whether crisp can write where a sweep or a run writes, checked before anything is written.

A folder that this process cannot write (a read-only sweep folder, another user's, one on a read-only
file system, or a file where a folder should be) would otherwise stop the sweep at its first ``mkdir``
with a PermissionError traceback, or fail every run one by one. :func:`check_writable` says in one line
which folder and why, as a :class:`~crisp.core.errors.ConfigError` (exit code 2).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from crisp.core.errors import ConfigError


def why_unwritable(target: str | os.PathLike) -> str | None:
    """Why this process could not create or write ``target`` (a folder), or None if it can."""
    target = Path(target).absolute()
    existing = target
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        kind = "a broken link" if existing.is_symlink() and not existing.exists() else "a file"
        return f"{existing} is {kind}, not a folder"
    if os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return None
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{existing} is on a read-only file system"
    info = existing.stat()
    return (f"permission denied: {existing} (mode {stat.filemode(info.st_mode)}, owner uid {info.st_uid}) cannot "
            f"be written by this process (uid {os.geteuid()})")


def check_writable(target: str | os.PathLike, what: str) -> None:
    """Raise a ConfigError that names ``what`` (the key or the run whose folder it is) if ``target`` cannot be
    written."""
    why = why_unwritable(target)
    if why is not None:
        raise ConfigError(f"{what} cannot be written: {why}")
