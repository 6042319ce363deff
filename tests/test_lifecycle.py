"""The one run lifecycle: a single run and a lockstep group claim, skip, record and write the same way."""

from __future__ import annotations

import errno
import json
import subprocess

import pytest

from crisp.core import lifecycle, results
from crisp.core.lifecycle import Run
from tests.conftest import run_crisp, smoke_overrides

BROKEN = ["data=sst2_local", "data.dir={folder}"]  # a label SST-2 does not have: found when the data loads


def broken_folder(tmp_path):
    folder = tmp_path / "tsv"
    folder.mkdir()
    for file in ("train.tsv", "dev.tsv"):
        (folder / file).write_text("sentence\tlabel\ngood film\t1\nbad film\t3\n")
    return folder


def shape(record: dict) -> dict:
    """What a results.json holds, by key, without the values that differ between two runs of one config."""
    def keys(node):
        return {k: keys(v) for k, v in node.items()} if isinstance(node, dict) else type(node).__name__
    record = {k: v for k, v in record.items() if k not in ("started_at", "finished_at")}
    return keys(record)


@pytest.mark.slow
def test_a_failing_job_gets_the_same_results_json_alone_and_in_a_lockstep_group(tmp_path):
    folder = broken_folder(tmp_path)
    overrides = [o.format(folder=folder) for o in BROKEN]
    alone = run_crisp(*smoke_overrides(tmp_path / "alone", *overrides))
    grouped = run_crisp("-m", *smoke_overrides(tmp_path / "group", *overrides, "hydra/launcher=lockstep", sweep=True),
                        "seed=1,2")
    assert alone.returncode == grouped.returncode == 2  # a data error, alone or in a group
    single = results.read(tmp_path / "alone")
    fused = results.read(tmp_path / "group" / "dense_seed1")
    for record in (single, fused):
        assert record["status"] == "failed" and record["error"]["type"] == "DataError"
        assert "train.tsv:3: label='3' is not allowed: labels must be 0 or 1" in record["error"]["message"]
    assert shape(single) == shape(fused)
    assert single["run_key"] == fused["run_key"]  # one config, one run, whichever way it ran
    assert not list(tmp_path.rglob(".crisp.lock"))


def test_train_that_raises_fails_every_run_it_had_not_finished_and_a_finished_one_stays(tmp_path):
    runs = [Run.of({"name": f"r{i}", "run_key": f"k{i}", "schema": 1}, tmp_path / f"r{i}") for i in range(3)]

    def train(todo):
        todo[0].complete({"final": {"val_acc": 0.9}})
        raise RuntimeError("the device went away")

    outcomes = lifecycle.attempt(runs, train)
    assert [o["status"] for o in outcomes] == ["completed", "failed", "failed"]
    assert json.loads((tmp_path / "r2" / "results.json").read_text())["error"]["message"] == "the device went away"
    # the same again: the completed run is skipped, under its claim; the others train
    again = lifecycle.attempt([Run.of(r.record, r.output_dir) for r in runs],
                              lambda todo: [r.complete({}) for r in todo])
    assert [o["status"] for o in again] == ["skipped", "completed", "completed"]
    assert not list(tmp_path.rglob(".crisp.lock"))


def test_a_full_disk_during_a_run_is_one_line_that_names_the_directory(tmp_path):
    def train(todo):
        raise OSError(errno.ENOSPC, "No space left on device")

    [outcome] = lifecycle.attempt([Run.of({"name": "r", "run_key": "k", "schema": 1}, tmp_path)], train)
    message = outcome["error"]["message"]
    assert outcome["error"]["type"] == "OutOfSpace" and f"no space left for 1 run(s) in {tmp_path}" in message
    assert "MiB free there, about 2 MiB needed" in message and "\n" not in message


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB file system (root only; CI runs as root)."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", str(where)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("grid", [False, True])
def test_a_full_disk_stops_a_run_or_a_grid_with_one_line_before_anything_is_written(full_disk, grid):
    out = full_disk / "out"
    args = ["-m", *smoke_overrides(out, sweep=True), "seed=1,2"] if grid else smoke_overrides(out)
    proc = run_crisp(*args)
    assert proc.returncode == 2
    assert f"crisp: error: no space left for {2 if grid else 1} run(s) in {out}:" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2
    assert not out.exists()


def test_a_stop_that_a_logging_call_swallowed_is_raised_at_the_next_beat():
    import logging

    from crisp.core import heartbeat

    class Stop(RuntimeError):
        pass

    class Raising(logging.Handler):  # a signal handler's raise inside logging's emit, as it happens
        def emit(self, record):
            try:
                raise Stop("time limit")
            except Stop:
                self.handleError(record)  # logging swallows it

    logger = logging.getLogger("crisp-test-swallow")
    logger.addHandler(Raising())
    logging.raiseExceptions, before = False, logging.raiseExceptions
    try:
        heartbeat.stop_with(Stop("time limit"))
        logger.warning("a line")  # the raise is lost here ...
        with pytest.raises(Stop):
            heartbeat.beat()  # ... and comes back at training's next step
        heartbeat.beat()  # once
    finally:
        logging.raiseExceptions = before
