"""Sweep tasks in worker processes: started, watched, and always cleaned up.

A task is one run (``hydra/launcher=parallel``) or a lockstep group of runs. Each runs in a worker
process of its own (:mod:`crisp.sweep.worker`), in its own process group, with its output in a log
file. On Linux the worker is forked from the sweep's process, which has already imported torch,
transformers and Lightning: a fresh ``python -m crisp.sweep.worker`` would spend seconds importing
them again (docs/performance.md). A fork is safe here because the sweep's process never initialises CUDA (GPUs
are counted through NVML); where it has, or off Linux, or with ``hydra.launcher.worker_start=exec``,
the worker is a fresh interpreter. The pool

- runs at most ``max_running`` tasks at once and gives each the visible GPU with the fewest tasks;
- ends a task whose heartbeat file (:mod:`crisp.core.heartbeat`) has not been touched for
  ``stall_timeout_s`` (a hung CUDA call, a deadlock, a stopped process) and says which it was;
- kills a task's whole process group when the task ends, and every running task when the sweep
  is interrupted (Ctrl-C, SIGTERM); workers also die with the sweep's process if it is killed
  outright (Linux's parent-death signal, set by the worker).

A worker exits when its task ends, so no process outlives its run holding a CUDA context. That is
what kept NVIDIA MPS from stopping at the end of a sweep: joblib's reusable workers stayed alive,
idle, with their contexts open, and MPS's ``quit`` waits for every client to go.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from crisp.core import heartbeat
from crisp.sweep import worker
from crisp.sweep.log_tail import log_tail

log = logging.getLogger("crisp")
PARENT_ENV = "CRISP_SWEEP_PID"


class SweepInterrupted(KeyboardInterrupt):
    """The sweep's process got SIGINT or SIGTERM."""


@dataclass
class WorkerTask:
    """What one worker runs: ``spec`` is pickled for it; ``label`` names it in logs."""

    label: str
    spec: dict[str, Any]
    files: Path  # spec, result and heartbeat files
    log_path: Path
    proc: subprocess.Popen | ForkedWorker | None = None
    gpu: str | None = None
    started: float = 0.0


@dataclass
class Outcome:
    """How a task ended: the worker's pickled result, or why there is none."""

    result: Any = None
    error: tuple[str, str] | None = None  # (kind, message)
    log_tail: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out (CUDA_VISIBLE_DEVICES, else every device)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class WorkerPool:
    """Runs a sweep's tasks in worker processes, ``max_running`` at once, each on the least-loaded visible
    GPU; ends a worker that stalls or that the sweep's interruption reaches; hands each task's outcome
    (its result, or why there is none) to the caller as the task ends (see the module)."""

    def __init__(self, max_running: int, stall_timeout_s: float, gpus: Sequence[str] = (), poll_s: float = 0.5,
                 grace_s: float = 10.0, fork: bool = False, progress: Any = None):
        self.progress = progress  # shows the running tasks' progress lines (crisp.sweep.progress.ProgressLines)
        self.max_running = max(1, int(max_running))
        self.stall_timeout_s = float(stall_timeout_s)
        self.gpus = list(gpus)
        self.poll_s, self.grace_s = poll_s, grace_s
        self.fork = fork

    def run(self, tasks: Sequence[WorkerTask], on_done: Callable[[WorkerTask, Outcome], None]) -> None:
        """Run every task; ``on_done`` is called once per task as it ends, in this process."""
        pending, running = deque(tasks), []
        try:
            with signals_raise():
                while pending or running:
                    if self.progress is not None:
                        self.progress.clear()  # the lines below it are printed where the block was
                    while pending and len(running) < self.max_running:
                        task = pending.popleft()
                        self._start(task, running)
                        running.append(task)
                    time.sleep(self.poll_s)
                    for task in list(running):
                        outcome = self._check(task)
                        if outcome is not None:
                            running.remove(task)
                            self._finish(task, outcome, on_done)
                    if self.progress is not None:
                        self.progress.show(running)
                if self.progress is not None:
                    self.progress.clear()
        except SweepInterrupted as stop:
            if self.progress is not None:
                self.progress.clear()
            for task in running:
                _kill_group(task.proc, self.grace_s)
            why = f"the sweep was interrupted ({stop})"
            for task in running:
                self._finish(task, self._outcome(task, ("Interrupted", why)), on_done)
            for task in pending:
                self._finish(task, Outcome(error=("Interrupted", f"{why} before it started")), on_done)
            raise

    @staticmethod
    def _finish(task: WorkerTask, outcome: Outcome, on_done: Callable[[WorkerTask, Outcome], None]) -> None:
        """Hand the outcome on, then remove the task's spec, result and heartbeat: a finished sweep's folder
        holds its runs, not the pickles that carried them."""
        on_done(task, outcome)
        shutil.rmtree(task.files, ignore_errors=True)
        for folder in (task.files.parent, task.files.parent.parent):
            with suppress(OSError):
                folder.rmdir()  # only if empty: another sweep may share the folder

    def _start(self, task: WorkerTask, running: list[WorkerTask]) -> None:
        task.files.mkdir(parents=True, exist_ok=True)
        task.log_path.parent.mkdir(parents=True, exist_ok=True)
        spec, result, beat = task.files / "spec.pkl", task.files / "result.pkl", task.files / "heartbeat"
        result.unlink(missing_ok=True)
        spec.write_bytes(cloudpickle.dumps(task.spec))
        beat.touch()
        env = {**os.environ, heartbeat.ENV: str(beat), PARENT_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        if self.gpus:
            load = {g: sum(t.gpu == g for t in running) for g in self.gpus}
            task.gpu = min(self.gpus, key=lambda g: load[g])
            env["CUDA_VISIBLE_DEVICES"] = task.gpu
        if self.fork:
            task.proc = ForkedWorker.start(task.spec["kind"], spec, result, task.log_path, env)
        else:
            with open(task.log_path, "ab") as out:
                task.proc = subprocess.Popen(
                    [sys.executable, "-m", "crisp.sweep.worker", str(spec), str(result)],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True,  # its own process group: everything it starts goes with it
                )
        task.started = time.monotonic()
        where = f" on GPU {task.gpu}" if task.gpu is not None else ""
        log.info("started %s%s (pid %d, log %s)", task.label, where, task.proc.pid, task.log_path)

    def _check(self, task: WorkerTask) -> Outcome | None:
        code = task.proc.poll()
        if code is not None:
            _kill_group(task.proc, 0)  # whatever it left behind (data-loader workers, DDP ranks)
            if code == 0 and (task.files / "result.pkl").is_file():
                result = cloudpickle.loads((task.files / "result.pkl").read_bytes())
                return Outcome(result=result, seconds=time.monotonic() - task.started)
            return self._outcome(task, ("WorkerDied", f"its worker process {_describe_exit(code)} before it finished"))
        silent = heartbeat.age_s(task.files / "heartbeat")
        if silent > self.stall_timeout_s:
            _kill_group(task.proc, self.grace_s)
            message = (f"stalled: its worker (pid {task.proc.pid}) showed no progress for {silent:.0f} s "
                       f"(stall_timeout_s={self.stall_timeout_s:g}) and was killed")
            return self._outcome(task, ("Stalled", message))
        return None

    def _outcome(self, task: WorkerTask, error: tuple[str, str]) -> Outcome:
        return Outcome(error=(error[0], f"{error[1]}; log: {task.log_path}"), log_tail=log_tail(task.log_path),
                       seconds=time.monotonic() - task.started if task.started else 0.0)


def fork_workers(worker_start: str) -> bool:
    """auto: fork where it is safe (:func:`can_fork`); fork; exec: a fresh interpreter for every worker
    (``hydra.launcher.worker_start``, checked by :mod:`crisp.sweep.options`)."""
    return can_fork() if worker_start == "auto" else worker_start == "fork"


def can_fork() -> bool:
    """Whether workers can be forked from this process: Linux, and CUDA not initialised here."""
    if not sys.platform.startswith("linux"):
        return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_initialized()


class ForkedWorker:
    """A worker forked from the sweep's process, with the part of ``subprocess.Popen`` the pool uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    @classmethod
    def start(cls, kind: str, spec: Path, result: Path, log_path: Path, env: dict[str, str]) -> ForkedWorker:
        worker.preload(kind)  # imported once here, not once per worker
        sys.stdout.flush()
        sys.stderr.flush()
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        pid = os.fork()
        if pid:
            os.close(log_fd)
            return cls(pid)
        code = 1
        try:  # the child: set up as ``python -m crisp.sweep.worker`` would be, then the same main()
            atexit._clear()  # the sweep's exit handlers are the sweep's (stopping the MPS daemon, ...)
            os.setsid()  # its own process group: everything it starts goes with it
            null = os.open(os.devnull, os.O_RDONLY)
            for fd, target in ((null, 0), (log_fd, 1), (log_fd, 2)):
                os.dup2(fd, target)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (line-buffered, to the log)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)  # not the sweep's handlers
            os.environ.clear()
            os.environ.update(env)
            code = worker.main([str(spec), str(result)])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            atexit._run_exitfuncs()  # the worker's own, as at a normal interpreter exit
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _kill_group(proc: subprocess.Popen | ForkedWorker | None, grace_s: float) -> None:
    """SIGTERM the worker's process group and give it ``grace_s``, then SIGKILL the whole group."""
    if proc is None:
        return
    if grace_s > 0 and proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    _signal_group(proc, signal.SIGKILL)  # also when the leader is gone: its children may not be
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.error("worker pid %d did not exit after SIGKILL", proc.pid)


def _signal_group(proc: subprocess.Popen | ForkedWorker, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)



@contextmanager
def signals_raise():
    """SIGINT and SIGTERM raise SweepInterrupted here, so that a launcher ends its workers (or cancels its
    SLURM array) before the sweep exits."""

    def handler(signum, frame):
        raise SweepInterrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
