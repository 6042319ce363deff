"""``hydra/launcher=parallel``: N runs at once on this machine, each in its own worker process.

Runs are spread over the visible GPUs (the one with the fewest runs first). Each worker's output
goes to ``worker.log`` in its run's directory; this process prints one line per run that ends.
"""

from __future__ import annotations

from hydra.core.utils import JobReturn

from crisp.sweep import launch
from crisp.sweep.jobs import Job


def launch_jobs(launcher, jobs: list[Job]) -> list[JobReturn]:
    sweep_dir = launch.prepare(launcher)
    tasks = [launch.task(launcher, f"job{job.idx}-{job.name}", "jobs", [job], job.output_dir / "worker.log")
             for job in jobs]
    options = launcher.options
    return launch.run_tasks(sweep_dir, tasks, jobs, options.n_jobs, options.stall_timeout_s, options.worker_start)
