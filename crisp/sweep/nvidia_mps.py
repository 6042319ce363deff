"""NVIDIA's Multi-Process Service (MPS) for a sweep of many runs on one GPU.

Without it, the runs' processes take turns on the GPU in time slices, and small encoders' kernels
(a few SMs each) leave most of it idle: many small runs at once train little faster in total than one
run alone. Under MPS their kernels share the GPU at the same time (docs/performance.md has the
measurement). ``sweep.mps=true`` starts a private MPS daemon when a ``-m`` sweep
starts; the runs' processes find it through ``CUDA_MPS_PIPE_DIRECTORY``.

Ending it is a matter of order. MPS's ``quit`` waits until every client process has gone, so the
daemon is stopped after the report, once the launcher's workers have exited (crisp's launchers
start one process per run or group, which exits with it; joblib's reusable workers did not, and
the sweep hung). Each daemon's pipe folder holds an ``owner`` file (host and pid of the sweep): a
daemon whose sweep was killed outright is found by the next sweep and stopped, and it says so.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

log = logging.getLogger("crisp")
CONTROL = "nvidia-cuda-mps-control"
PREFIX = "crisp-mps-"
_ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")
# quit waits for the daemon's clients: crisp's own are gone by then, so this only bounds a stranger's
QUIT_TIMEOUT_S = 120


class MPSError(RuntimeError):
    pass


def _control(key: str = "sweep.mps") -> str:
    control = shutil.which(CONTROL)
    if control is None:
        raise MPSError(f"{key}=true needs {CONTROL} (it comes with the NVIDIA driver) on PATH; set {key}=false")
    return control


def start(key: str = "sweep.mps") -> str:
    """Start a daemon with its own pipe folder; point this process (and its children) at it."""
    control = _control(key)
    stop_abandoned()
    pipe = tempfile.mkdtemp(prefix=PREFIX)
    with open(os.path.join(pipe, "owner"), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    env = dict.fromkeys(_ENV, pipe)
    done = subprocess.run([control, "-d"], env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        shutil.rmtree(pipe, ignore_errors=True)
        raise MPSError(f"{key}=true: {CONTROL} -d failed ({done.stderr.strip() or done.returncode}); set {key}=false")
    os.environ.update(env)
    atexit.register(stop)  # also when the sweep ends by an exception or a signal
    log.info("MPS daemon started (pipe %s): the runs' kernels share the GPU", pipe)
    return pipe


def stop() -> None:
    """Stop the daemon this process started (if any) and forget it."""
    pipe = os.environ.get(_ENV[0])
    if not _is_ours(pipe) or _owner(pipe) != (socket.gethostname(), os.getpid()):
        return  # not started by this process (a system daemon, or a sweep's worker): leave it alone
    _quit(pipe)
    for name in _ENV:
        os.environ.pop(name, None)
    log.info("MPS daemon stopped")


def stop_abandoned() -> list[str]:
    """Stop every crisp MPS daemon on this host whose sweep is gone; returns their pipe folders."""
    stopped = []
    for pipe in sorted(glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*"))):
        owner = _owner(pipe)
        if owner is not None and owner[0] == socket.gethostname() and _alive(owner[1]):
            continue  # another sweep is using it
        who = f"sweep pid {owner[1]}" if owner else "an unknown sweep"
        log.warning("found an MPS daemon left by an earlier sweep (%s, pipe %s): stopping it", who, pipe)
        _quit(pipe)
        stopped.append(pipe)
    return stopped


def _quit(pipe: str) -> None:
    env = {**os.environ, **dict.fromkeys(_ENV, pipe)}
    control = shutil.which(CONTROL)
    try:
        if control is not None:
            subprocess.run([control], input="quit\n", text=True, env=env, capture_output=True, check=False,
                           timeout=QUIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        clients = [pid for pid in _processes_using(pipe) if not _is_mps_process(pid)]
        log.error("MPS daemon (pipe %s) did not quit within %d s: processes still attached: %s; killing it",
                  pipe, QUIT_TIMEOUT_S, clients or "none found")
    for pid in _processes_using(pipe):
        if _is_mps_process(pid):
            _kill(pid)
    shutil.rmtree(pipe, ignore_errors=True)


@contextmanager
def daemon(key: str = "--mps"):
    start(key)
    try:
        yield
    finally:
        stop()


# ---------------------------------------------------------------------------------------------- processes


def _is_ours(pipe: str | None) -> bool:
    return bool(pipe) and os.path.basename(pipe).startswith(PREFIX) and os.path.isdir(pipe)


def _owner(pipe: str) -> tuple[str, int] | None:
    try:
        host, pid = Path(pipe, "owner").read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _processes_using(pipe: str) -> list[int]:
    """Processes whose environment points CUDA at this MPS pipe folder (daemons and clients)."""
    needle = f"{_ENV[0]}={pipe}".encode()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _is_mps_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip().startswith("nvidia-cuda-mps")
    except OSError:
        return False
