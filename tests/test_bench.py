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
