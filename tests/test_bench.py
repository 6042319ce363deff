"""The attention benchmark runs and reports every implementation (timings themselves are not tested)."""

from __future__ import annotations

import json

from crisp import bench


def test_attention_bench_writes_every_implementation(tmp_path, capsys):
    out = tmp_path / "attention.json"
    bench.main(["attention", "--cpu", "--encoders", "minilm-l6", "--shapes", "2x8", "--steps", "2",
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
    summary = bench._compare(baseline, grid)
    per_run = ((70 + 2 * 50) + (80 + 2 * 58)) / 2
    assert summary["untuned_seconds_per_run"] == per_run
    assert summary["untuned_sequential_seconds_extrapolated"] == 21 * per_run
    assert summary["speedup"] == round(21 * per_run / 300, 2)
    assert summary["samples_per_second_total_grid"] == 210.0


def test_kernel_bench_times_eager_and_crisp_probabilities(tmp_path):
    out = tmp_path / "kernel.json"
    bench.main(["kernel", "--cpu", "--shapes", "2x8", "--dtypes", "fp32", "--reps", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    # no Triton on a CPU tensor: the fused kernel is left out, not faked
    assert [r["implementation"] for r in rows] == ["eager softmax", "crisp sort"]
    assert rows[0]["vs_eager"] == 1.0 and all(r["us_fwd_bwd"] > 0 for r in rows)
