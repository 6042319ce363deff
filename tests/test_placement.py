"""Lockstep groups over several GPUs: split and handed out by their cost (runs x parameters x epochs x
training text), so that no GPU is left with the one large group after the others are done."""

from __future__ import annotations

from pathlib import Path

import pytest

from crisp.sweep import placement
from crisp.sweep.lockstep_launcher import plan
from tests.test_lockstep import _job


def _finish(costs: list[float], where: list[list[int]]) -> float:
    return max(sum(costs[k] for k in tasks) for tasks in where)


def test_groups_are_placed_by_cost_not_by_count():
    # one MNLI-sized group and eight small ones on two GPUs: the large one gets a GPU to itself
    costs = [1.0] * 4 + [8.0] + [1.0] * 4
    where = placement.placement(costs, devices=2)
    assert sorted(map(sorted, where)) == [[0, 1, 2, 3, 5, 6, 7, 8], [4]]
    assert _finish(costs, where) == 8.0
    # handed out in the order given instead, the large group starts last and finishes alone: 10
    loads = [0.0, 0.0]
    for c in costs:
        loads[loads.index(min(loads))] += c
    assert max(loads) == 10.0
    # every task placed once, on one of the devices, with more devices than tasks too
    for devices in (1, 3, 12):
        where = placement.placement(costs, devices)
        assert len(where) == devices and sorted(k for tasks in where for k in tasks) == list(range(len(costs)))


def _folder(tmp_path: Path, name: str, rows: int, width: int) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{'w' * width}\t1\n" for _ in range(rows)))
    return folder


def test_a_groups_training_text_is_its_train_files_bytes_else_its_rows_else_equal(tmp_path):
    short, long = _folder(tmp_path, "short", 100, 10), _folder(tmp_path, "long", 100, 50)
    local = [_job(tmp_path, "data=sst2_local", f"data.dir={folder}") for folder in (short, long)]
    local.append(_job(tmp_path, "data=sst2_local", f"data.dir={long}", "data.train_limit=50"))
    small, big, half = placement.text_sizes(local)
    assert big > 4 * small and half == pytest.approx(big * 50 / 101)  # of the file's 101 lines, 50
    generated = [_job(tmp_path, "data.num_train=64"), _job(tmp_path, "data.num_train=256")]
    assert placement.text_sizes(generated) == [64.0, 256.0]
    # one unit for all, or none: a file's bytes beside generated rows, or the hub's unknown size
    assert placement.text_sizes([local[0], generated[1]]) == [1.0, 1.0]
    assert placement.text_sizes([_job(tmp_path, "data=sst2", "data.dir=null"), generated[0]]) == [1.0, 1.0]


def test_your_own_training_files_bytes_measure_their_groups(tmp_path):
    short, long = _folder(tmp_path, "short", 100, 10), _folder(tmp_path, "long", 100, 50)
    jobs = [_job(tmp_path, "data=files", f"data.train_file={folder / 'train.tsv'}",
                 f"data.validation_file={folder / 'train.tsv'}", "data.text_fields=[sentence]")
            for folder in (short, long)]
    assert placement.text_sizes(jobs) == [(folder / "train.tsv").stat().st_size for folder in (short, long)]


def test_with_more_gpus_than_groups_the_costliest_group_is_split_and_groups_go_costliest_first(tmp_path):
    # four runs on a little data, two runs on eight times the data: on two GPUs the pair is split
    few = [_job(tmp_path, f"seed={s}", "data.num_train=800") for s in (1, 2)]
    many = [_job(tmp_path, f"seed={s}", "data.num_train=100") for s in (1, 2, 3, 4)]
    cost = placement.cost_of(few + many, parameters=lambda job: 1000)
    groups = plan(many + few, capacity=None, devices=3, cost=cost)
    assert [len(g) for g in groups] == [1, 1, 4]  # by count the group of four would have been split
    assert [cost(g) for g in groups] == sorted((cost(g) for g in groups), reverse=True)
    assert plan(many + few, capacity=None, devices=3)[0] != groups[0]  # by count instead: not the same plan


def test_a_sweep_on_two_gpus_hands_out_its_groups_costliest_first(tmp_path, caplog):
    """As the launcher groups a sweep's jobs: each recipe's model counted on the meta device, each
    group's share of the cost logged per GPU slot."""
    import dataclasses
    import logging

    from crisp.sweep.lockstep_launcher import group_jobs

    jobs = [_job(tmp_path, f"seed={s}", f"data.num_train={n}") for n, s in ((64, 1), (64, 2), (512, 1))]
    jobs = [dataclasses.replace(job, idx=k, output_dir=tmp_path / f"run{k}", record={"output_dir": f"run{k}",
            "run_key": f"key{k}"}) for k, job in enumerate(jobs)]
    with caplog.at_level(logging.INFO, logger="crisp"):
        _, groups = group_jobs(jobs, max_runs=None, devices=2)
    assert [[job.idx for job in g] for g in groups] == [[2], [0, 1]]  # 1 x 512 rows before 2 x 64
    assert "GPU slot 0 expects groups [0] (80% of the cost)" in caplog.text
    _, one_gpu = group_jobs(jobs, max_runs=None, devices=1)
    assert [[job.idx for job in g] for g in one_gpu] == [[0, 1], [2]]  # one GPU: the sweep's own order
