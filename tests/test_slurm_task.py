"""What one SLURM array task records, in this process (no cluster needed; tests/test_slurm.py runs them on one)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
from hydra._internal.callbacks import Callbacks
from hydra.core.hydra_config import HydraConfig
from hydra.types import HydraContext
from omegaconf import open_dict

from crisp.core import results
from crisp.sweep.slurm_task import ArrayTask
from tests.test_lockstep import _job

LIMIT = "SLURM task 7 reached its time limit (timeout_min=1) and has no requeue left"


@pytest.mark.parametrize("ended", ["recorded by the run", "raised out of it"])
def test_a_run_the_last_time_limit_stopped_is_recorded_so_whatever_error_it_ended_with(tmp_path, ended):
    """The limit stops training by raising from a signal handler, wherever the process then is. Code there may
    turn that exception into another (one landing in an import leaves a module half made, whose next use fails):
    the run is still recorded as stopped by the time limit, and what it ended with is kept in its traceback.
    The runs the task had not started are recorded the same way."""
    jobs = []
    for idx, name in enumerate(("stopped", "not_started")):
        job = _job(tmp_path / name, f"seed={idx + 1}")
        with open_dict(job.config):
            job.config.hydra.sweep.dir, job.config.hydra.sweep.subdir = str(tmp_path), name
        job.record = {"run_key": name, "name": name, "schema": results.SCHEMA_VERSION}
        jobs.append(job)

    def training_stopped_by_the_limit(cfg):
        task._out_of_time = LIMIT  # what the task's signal handler sets, before it raises
        error = TypeError("softmax() received an invalid combination of arguments")
        if ended == "raised out of it":
            raise error
        output_dir = HydraConfig.get().runtime.output_dir  # as crisp.run records a failure and returns it
        return results.record_failure(output_dir, jobs[0].record, {"type": "TypeError", "message": str(error),
                                                                   "traceback": "Traceback (...)"})

    task = ArrayTask(jobs, HydraContext(config_loader=None, callbacks=Callbacks()), training_stopped_by_the_limit,
                     {}, timeout_min=1, max_num_timeout=0)
    task._out_of_time = None
    returns = task.run(jobs)
    for job, ret in zip(jobs, returns, strict=True):
        record = results.read(job.output_dir)
        assert ret.return_value == record and record["status"] == "failed"
        assert record["error"]["type"] == "SlurmTimeLimit" and record["error"]["message"] == LIMIT
    stopped = results.read(jobs[0].output_dir)["error"]["traceback"]
    assert stopped.startswith("the run ended with TypeError: softmax() received an invalid combination")


def test_a_task_out_of_requeues_before_it_started_its_runs_records_them_stopped_by_the_time_limit(tmp_path):
    """At the last limit before the task has started its runs (still loading), submitit raises its own error and
    writes it as the task's result: the runs are recorded as stopped by the time limit, not as a crash."""
    from crisp.sweep import slurm

    job = _job(tmp_path / "run", "seed=1")
    job.record = {"run_key": "run", "name": "run", "schema": results.SCHEMA_VERSION}
    result = tmp_path / "7_0_result.pkl"
    result.write_bytes(pickle.dumps(("error", "Traceback (most recent call last):\n  ...\n"
                                              "submitit.core.utils.UncompletedJobError: Job not requeued because: "
                                              "timed-out too many times.\n")))
    paths = SimpleNamespace(result_pickle=result, stdout=tmp_path / "7_0_log.out")
    tracked = slurm.Tracked(SimpleNamespace(jobs=[job]), SimpleNamespace(job_id="7_0", paths=paths))
    [ret] = slurm._outcome(tracked, "COMPLETED", "node1", "0:0", {"timeout_min": 1, "max_num_timeout": 2})
    record = results.read(job.output_dir)
    assert ret.return_value == record and record["error"]["type"] == "SlurmTimeLimit"
    assert record["error"]["message"].startswith("SLURM task 7_0 reached its time limit (timeout_min=1) and has no "
                                                 "requeue left (max_num_timeout=2)")
