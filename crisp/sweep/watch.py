"""Processes that end with their sweep, however the sweep ends.

A worker that the sweep starts itself gets Linux's parent-death signal (:mod:`crisp.sweep.worker`).
submitit's local jobs run one process further down, under a controller process that outlives the
sweep: a parent-death signal there would watch the controller. :func:`end_with` watches the sweep's
process instead, from a thread in the job, and ends the job (and what it started) once that process is
gone, ``kill -9`` included; its controller then exits by itself. A process is known by its pid and its
start time, so a pid that the system gave to another process since is not taken for the sweep.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("crisp")


@dataclass(frozen=True)
class Process:
    pid: int
    started: str | None  # the start time in /proc/<pid>/stat (None where there is no /proc)

    @classmethod
    def this(cls) -> Process:
        return cls(os.getpid(), _start_time(os.getpid()))

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's: alive, but then it is not ours, unless /proc says so below
        if _zombie(self.pid):  # dead, not yet reaped by its parent
            return False
        return self.started is None or _start_time(self.pid) == self.started


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else None  # field 22 of stat(5)


def _zombie(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...), read from /proc (Linux; else none)."""
    children: dict[int, list[int]] = {}
    with suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                fields = _stat(int(entry))
                if fields and len(fields) > 1:
                    children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


def kill_tree(pid: int, include_self: bool = True, wait_s: float = 10.0) -> list[int]:
    """SIGKILL ``pid`` and every process below it (all found first, then killed), wait until they are gone (or
    dead and waiting for their parent), and return their pids."""
    targets = descendants(pid) + ([pid] if include_self else [])
    for target in targets:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(target, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    for target in targets:
        while time.monotonic() < deadline:
            with suppress(ChildProcessError):
                os.waitpid(target, os.WNOHANG)  # ours to reap, if it is our child
            try:
                os.kill(target, 0)
            except ProcessLookupError:
                break
            if _zombie(target):  # dead; its parent (not us) reaps it
                break
            time.sleep(0.05)
    return targets


def end_with(sweep: Process, poll_s: float = 1.0) -> threading.Thread:
    """Watch ``sweep`` from a daemon thread; when its process is gone, end this process and what it started."""

    def watch() -> None:
        while sweep.alive():
            time.sleep(poll_s)
        print(f"crisp: the sweep's process (pid {sweep.pid}) is gone: this run ends with it", file=sys.stderr,
              flush=True)
        kill_tree(os.getpid(), include_self=False, wait_s=0)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="crisp-sweep-watch", daemon=True)
    thread.start()
    return thread
