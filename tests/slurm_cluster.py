"""A real one-node SLURM cluster on this machine, for the tests marked ``slurm``.

It runs the daemons of Debian's ``slurm-wlm`` and ``munge`` packages (``apt-get install slurm-wlm
munge``) from a private temporary directory: its own munge key and socket, a generated
``slurm.conf``, state, spool, pid and log files, and free TCP ports, so it neither needs nor touches
a system SLURM or munge. Clients find it through ``SLURM_CONF`` (see :meth:`SlurmCluster.env`);
jobs inherit that variable from ``sbatch``.

Configuration choices, for a container with no cgroups and two cores:

- ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``, ``JobAcctGatherType=none``: no
  cgroup plugin (they need a writable cgroup hierarchy); linuxproc still finds a job's processes
  through /proc, so scancel and requeue end a job's whole process tree.
- ``SelectType=select/cons_tres`` with ``CR_Core``: array tasks asking for one CPU share the node.
- ``SlurmdParameters=config_overrides``: the node may declare more CPUs than the machine has, so
  a test chooses how many tasks run at once, not the hardware.
- ``KillWait=5``: a cancelled or requeued task gets 5 s between SIGTERM and SIGKILL (30 by default);
  ``AuthInfo=...,cred_expire=10``: a requeued task may start again after 11 s (121 by default);
  ``sched_interval=2,bf_interval=2``: pending tasks are looked at every 2 s (60 and 30 by default).
  These keep the preemption and time-limit tests short; SLURM's time-limit check itself runs every
  30 s (compiled in), so a 1-minute task with signal_delay_s=10 gets its SIGUSR2 20-50 s after it starts.
- ``MinJobAge=600``: finished jobs stay in slurmctld's memory (``squeue -t all``, ``scontrol``)
  long enough for a test session; a test can still requeue a task that completed.
- No accounting (``accounting_storage/none``): slurmdbd needs a MySQL/MariaDB server; many small
  clusters run without it, and crisp's launcher must work there (``sacct`` then only says that
  accounting is disabled).

Every daemon runs in the foreground as a child of this process and is stopped by :meth:`stop`,
after every job is cancelled and has left the node (also when a test failed); then the temporary
directory is removed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
INSTALL_HINT = "apt-get install slurm-wlm munge (as root)"


class ClusterUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (the slurm tests are skipped with it)."""


def missing_requirements() -> str | None:
    """Why a test cluster cannot be started on this machine, or None if it can be tried."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM is not installed (no {', '.join(missing)} on PATH): {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the test cluster's slurmd must run as root (it starts jobs as their users): run pytest -m slurm as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd with one partition of one node, all under ``root``."""

    def __init__(self, root: Path | None = None, cpus: int = 4, partition: str = "crisp", node: str = "crisp-node"):
        self._own_root = root is None  # a directory made here is removed by stop()
        self.root = Path(root or tempfile.mkdtemp(prefix="crisp-slurm-"))
        self.cpus, self.partition, self.node = cpus, partition, node
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self) -> dict[str, str]:
        """The environment that points SLURM's commands (and the jobs they start) at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> str:
        """A SLURM command against this cluster; its stdout."""
        proc = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    # --- start -------------------------------------------------------------------------------

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        why = missing_requirements()
        if why:
            raise ClusterUnavailable(why)
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._wait(lambda: self.run("scontrol", "ping", check=False).count("UP") > 0, timeout_s, "slurmctld")
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait(lambda: self.node_state() == "idle", timeout_s, f"node {self.node} to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        munge = self.munge_socket.parent
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={munge / 'munged.pid'}",
                               f"--log-file={self.root / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"])
        self._wait(self.munge_socket.exists, 20, "munged's socket")

    def _write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        host = socket.gethostname().split(".")[0]
        settings = {
            "ClusterName": "crisptest",
            "SlurmctldHost": f"{host}(127.0.0.1)",
            "SlurmctldPort": _free_port(),
            "SlurmdPort": _free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket},cred_expire=10",
            "StateSaveLocation": self.root / "state",
            "SlurmdSpoolDir": self.root / "spool",
            "SlurmctldPidFile": self.root / "slurmctld.pid",
            "SlurmdPidFile": self.root / "slurmd.pid",
            "SlurmctldLogFile": self.root / "slurmctld.log",
            "SlurmdLogFile": self.root / "slurmd.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "SchedulerType": "sched/backfill",
            "SchedulerParameters": "sched_interval=2,bf_interval=2",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "SlurmdParameters": "config_overrides",
            "MpiDefault": "none",
            "ReturnToService": 2,
            "KillWait": 5,
            "MinJobAge": 600,
            "InactiveLimit": 0,
            "SlurmctldTimeout": 30,
            "SlurmdTimeout": 60,
        }
        lines = [f"{k}={v}" for k, v in settings.items()]
        lines.append(f"NodeName={self.node} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                     "RealMemory=4096 State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / f"{name}.out", "ab")  # noqa: SIM115 (the daemon keeps writing to it)
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(), start_new_session=True)
        out.close()

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterUnavailable(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                             f"{self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise ClusterUnavailable(f"timed out after {timeout_s:g} s waiting for {what}:\n{self.log_tail()}")

    def log_tail(self, *names: str, lines: int = 15) -> str:
        names = names or tuple(self.procs)
        parts = []
        for name in names:
            for path in (self.root / f"{name}.out", self.root / f"{name}.log"):
                if path.is_file() and path.stat().st_size:
                    tail = path.read_text(errors="replace").splitlines()[-lines:]
                    parts.append(f"--- {path} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    # --- state -------------------------------------------------------------------------------

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False).strip().rstrip("*~#")

    def task_states(self, job_id: str) -> dict[str, str]:
        """``{"<job>_<task>": STATE}`` for every task of array job ``job_id`` that slurmctld remembers."""
        out = self.run("squeue", "-h", "-t", "all", "-r", "-j", str(job_id), "-o", "%i|%T", check=False)
        return dict(line.split("|", 1) for line in out.split())

    def jobs(self) -> list[str]:
        """Ids of the jobs that are pending, running or completing."""
        return self.run("squeue", "-h", "-o", "%i", check=False).split()

    # --- stop --------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 30) -> None:
        """Cancel every job, wait for the node to be empty, then stop slurmd, slurmctld and munged."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "-u", "root", check=False)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.jobs():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                _terminate(proc)
        for proc in self.procs.values():
            _terminate(proc)
        self.procs.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


def _terminate(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the daemon's process group, SIGKILL it if it is still there after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
