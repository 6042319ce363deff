"""The attention benchmark runs and reports every implementation (timings themselves are not tested)."""

from __future__ import annotations

import json

import pytest

from crisp.bench import cli
from crisp.bench.grid import _compare
from tests.conftest import run_crisp


def test_attention_bench_writes_every_implementation(tmp_path, capsys):
    out = tmp_path / "attention.json"
    cli.main(["attention", "--cpu", "--encoders", "minilm-l6", "--shapes", "2x8", "--steps", "2",
                "--rounds", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["implementation"] for r in rows] == ["eager", "sdpa", "crisp s=0", "crisp s=0.8"]
    assert rows[0]["vs_eager"] == 1.0 and all(r["ms_per_step"] > 0 for r in rows)
    assert "| eager | minilm-l6 | 2 x 8 |" in capsys.readouterr().out  # no CUDA graphs on the CPU


def test_sweep_summary_scales_shorter_baseline_runs_to_the_grids_epochs():
    """Two 1-epoch untuned runs stand for 3-epoch grid runs: start-up once, training time x3."""
    baseline = {"wall_seconds": [70.0, 80.0],
                "runs": {"fit_seconds": [50.0, 58.0], "epochs": [1, 1], "samples_per_second": [1300.0, 1200.0]}}
    grid = {"wall_seconds": 300.0,
            "runs": {"completed": 21, "epochs": [3] * 21, "samples": 21 * 3 * 1000,
                     "samples_per_second": [700.0] * 21, "peak_gpu_memory_mb": [1000.0] * 21}}
    summary = _compare(baseline, grid)
    per_run = ((70 + 2 * 50) + (80 + 2 * 58)) / 2
    assert summary["untuned_seconds_per_run"] == per_run
    assert summary["untuned_sequential_seconds_extrapolated"] == 21 * per_run
    assert summary["speedup"] == round(21 * per_run / 300, 2)
    assert summary["samples_per_second_total_grid"] == 210.0


def test_step_bench_trains_the_grid_as_one_group_and_times_its_steps(tmp_path):
    """Two learning rates of the paper grid's 7 runs per seed, one group; on the CPU there are no kernels to count."""
    out = tmp_path / "step.json"
    cli.main(["step", "--seeds", "1", "--lrs", "1e-3", "3e-3", "--skip", "2", "--timed", "2", "--profiled", "1",
                "--out", str(out), "experiment=smoke", "data.num_train=256"])
    found = json.loads(out.read_text())
    assert found["runs"] == found["completed"] == 14 and found["step_ms"] > 0
    assert found["lrs"] == ["1e-3", "3e-3"] and "data.train_limit=192" in found["overrides"]


def test_step_bench_names_kinds_of_kernels():
    from crisp.bench.step import kind_of

    assert kind_of("nvjet_sm90_tst_128x256_64x4_1x2_h_badd_coopA_NNN") == "matmul"
    assert kind_of("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "AdamW"
    assert kind_of("_dropout_kernel") == "dropout" and kind_of("_topk_softmax_kernel").startswith("attention")


def test_step_bench_sums_a_profile_by_kind_host_op_and_idle_gap():
    """Two profiled steps of a matmul (launched by bmm) and a memset, 3 us apart: per step the kernel time,
    who launched the memset (and how many kernels each host op launched), and the GPU's idle time before
    each kernel."""
    from types import SimpleNamespace as E

    import torch

    from crisp.bench.step import breakdown, idle_between_kernels

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events, host = [], E(name="aten::bmm", cpu_parent=None)
    for step in range(2):
        t = 100.0 * step
        matmul = E(name="nvjet_sm90_tst", device_type=cuda, device_time=10.0, duration=10.0,
                   time_range=E(start=t, end=t + 10), kernels=[])
        memset = E(name="Memset (Device)", device_type=cuda, device_time=1.0, duration=1.0,
                   time_range=E(start=t + 13, end=t + 14), kernels=[])
        events += [matmul, memset, E(name="aten::zero_", device_type=cpu, cpu_parent=host, kernels=[memset])]
    profile = E(events=lambda: events)
    found = breakdown(profile, steps=2)
    assert found["by_kind_ms"] == {"matmul": 0.01, "copies and casts": 0.001}
    assert found["memsets_per_step_by_host_op"] == {"aten::bmm > aten::zero_": 1.0}
    assert found["kernels_per_step_by_host_op"] == {"aten::bmm > aten::zero_": 1.0}
    idle = idle_between_kernels(profile, steps=2)
    # 3 us before each memset; the 86 us from a memset to the next step's matmul counts too (under 500)
    assert idle["kernels_per_step"] == 2 and idle["idle_before_ms"]["Memset (Device)"] == 0.003
    assert idle["idle_ms_per_step"] == 0.046


def test_kernel_bench_times_eager_and_crisp_probabilities(tmp_path):
    out = tmp_path / "kernel.json"
    cli.main(["kernel", "--cpu", "--shapes", "2x8", "--dtypes", "fp32", "--reps", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    # no Triton on a CPU tensor: the fused kernel is left out, not faked
    assert [r["implementation"] for r in rows] == ["eager softmax", "crisp sort"]
    assert rows[0]["vs_eager"] == 1.0 and all(r["us_fwd_bwd"] > 0 for r in rows)


def _peer_inputs(root):
    """A tiny BERT folder (its own word-piece vocabulary) and GLUE-format TSVs whose label is learnable."""
    import random

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["good", "great", "bad", "awful", "movie", "plot", "fine", "dull"]
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    BertTokenizerFast(str(root / "vocab.txt")).save_pretrained(root / "model")
    config = BertConfig(vocab_size=13, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    rng = random.Random(0)
    (root / "data").mkdir()
    for name, n in (("train.tsv", 256), ("dev.tsv", 64)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            sentence = rng.choices(words, k=5)
            lines.append(" ".join(sentence) + f"\t{int('good' in sentence or 'great' in sentence)}")
        (root / "data" / name).write_text("\n".join(lines) + "\n")
    return root / "model", root / "data"


@pytest.mark.slow
def test_grid_bench_times_the_users_command_to_its_report_beside_a_trainer_peer(tmp_path):
    model, data = _peer_inputs(tmp_path)
    grid = ["-m", "experiment=smoke", "data.num_train=256", "data.num_val=64", "trainer.max_epochs=1", "seed=1,2",
            "hydra/launcher=lockstep", f"hydra.sweep.dir={tmp_path / 'grid'}"]
    proc = run_crisp("grid", "--dir", str(tmp_path / "bench"), "--peer-model", str(model), "--peer-data", str(data),
                     "--", *grid, module="crisp.bench")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "bench" / "bench_grid.json").read_text())
    assert record["exit_code"] == 0 and record["report"] and record["runs"]["completed"] == 2
    assert record["command"] == "python -m crisp.run " + " ".join(grid)
    peer = record["peer"]
    assert 0 < peer["train_seconds"] < peer["command_seconds"] and peer["epochs"] == 1
    assert 0.0 <= peer["val_acc"] <= 1.0
    assert peer["model"] == model.name  # the folder's name: committed results show no machine's paths
    summary = record["summary"]
    # one grid run done the peer's way: its start-up once, then the grid's epochs at the peer's pace
    per_run = peer["command_seconds"] - peer["train_seconds"] + peer["train_seconds"] * summary["grid_epochs"]
    assert summary["peer_seconds_per_grid_run"] == pytest.approx(per_run, abs=0.1)
    assert summary["speedup_vs_peer"] == pytest.approx(2 * per_run / record["wall_seconds"], rel=0.01)
