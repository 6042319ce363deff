"""``hydra/launcher=parallel``: N runs at once on this machine, each in its own worker process.

Runs are spread over the visible GPUs (the one with the fewest runs first). Each worker's output
goes to ``worker.log`` in its run's directory; this process prints one line per run that ends.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn

from crisp.sweep import launch


def launch_jobs(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    sweep_dir, jobs = launch.prepare(launcher, job_overrides, initial_job_idx)
    tasks = [launch.task(launcher, f"job{job.idx}-{job.name}", "jobs", [job], job.output_dir / "worker.log")
             for job in jobs]
    return launch.run_tasks(sweep_dir, tasks, jobs, launcher.n_jobs, launcher.stall_timeout_s, launcher.worker_start)
