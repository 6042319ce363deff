"""Strategies: per-layer values, mean preservation, adaptive's monotonicity (crisp/sparsity/strategies.py)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crisp
from crisp.sparsity.calibration import measure_entropy
from crisp.sparsity.strategies import MAX_LAYER_SPARSITY, adaptive, ramp, uniform
from tests.conftest import VOCAB, tiny_model


def test_uniform():
    assert uniform(4, 0.7) == [0.7] * 4


def test_ramp_is_linear_in_depth_and_mean_preserving():
    values = ramp(5, 0.6, spread=0.2)
    assert values == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7])
    reverse = ramp(5, 0.6, spread=-0.2)
    assert reverse == pytest.approx(values[::-1])


def test_ramp_redistributes_clipping():
    values = ramp(4, 0.9, spread=0.3)  # 0.75..1.05 before clipping at 0.95
    assert max(values) == pytest.approx(MAX_LAYER_SPARSITY)
    assert sum(values) / 4 == pytest.approx(0.9, abs=1e-6)
    assert values == sorted(values)


def test_adaptive_gives_peaked_layers_more_sparsity():
    entropy = [0.9, 0.5, 0.7, 0.3]
    values = adaptive(4, 0.7, entropy=entropy, spread=0.2)
    assert values == pytest.approx([0.6, 0.7 + 0.2 / 6, 0.7 - 0.2 / 6, 0.8])  # 0.7 + 0.2 * (0.6 - H) / 0.6
    assert adaptive(3, 0.5, entropy=[0.4, 0.4, 0.4]) == pytest.approx([0.5] * 3)


def test_adaptive_rejects_infeasible_mean():
    with pytest.raises(ValueError, match="sparsity=0.97"):
        adaptive(3, 0.97, entropy=[0.1, 0.2, 0.3])


@settings(max_examples=200, deadline=None)
@given(
    entropy=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    s=st.floats(0.0, MAX_LAYER_SPARSITY),
    spread=st.floats(0.0, 3.0),
)
def test_adaptive_properties(entropy, s, spread):
    values = adaptive(len(entropy), s, entropy=entropy, spread=spread)
    assert all(0 <= v <= MAX_LAYER_SPARSITY for v in values)
    assert sum(values) / len(values) == pytest.approx(s, abs=1e-6)
    for (h1, v1) in zip(entropy, values, strict=True):
        for (h2, v2) in zip(entropy, values, strict=True):
            if h1 < h2:
                assert v1 >= v2 - 1e-12  # non-increasing in entropy


@settings(max_examples=100, deadline=None)
@given(layers=st.integers(1, 24), s=st.floats(0.0, MAX_LAYER_SPARSITY), spread=st.floats(-2.0, 2.0))
def test_ramp_properties(layers, s, spread):
    values = ramp(layers, s, spread=spread)
    assert all(0 <= v <= MAX_LAYER_SPARSITY for v in values)
    assert sum(values) / layers == pytest.approx(s, abs=1e-6)
    ordered = values if spread >= 0 else values[::-1]
    assert all(a <= b + 1e-12 for a, b in zip(ordered, ordered[1:], strict=False))


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, VOCAB, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(n)]


def test_apply_strategy_adaptive_calibrates_on_dense_model():
    model = tiny_model("bert")
    crisp.set_sparsity(model, 0.5)  # calibration must measure the dense model anyway
    entropy = measure_entropy(model, _batches())
    assert crisp.get_sparsity(model) == [0.5] * 3  # restored afterwards
    crisp.set_sparsity(model, 0.0)
    assert measure_entropy(model, _batches()) == pytest.approx(entropy)
    values = crisp.apply_strategy(model, "adaptive", 0.7, calibration_batches=_batches())
    assert values == pytest.approx(adaptive(3, 0.7, entropy=entropy))
    assert crisp.get_sparsity(model) == values
    assert model.crisp_calibration_entropy == pytest.approx(entropy)
    # an entropy measured already (lockstep: the runs of a seed share one calibration) is not measured again
    other = tiny_model("bert")
    assert crisp.apply_strategy(other, "adaptive", 0.7, entropy=model.crisp_calibration_entropy) == values
    assert other.crisp_calibration_entropy == model.crisp_calibration_entropy


def test_apply_strategy_dense_and_errors():
    model = tiny_model("distilbert")
    assert crisp.apply_strategy(model, "adaptive", 0.0) == [0.0] * 3  # dense: no calibration needed
    assert crisp.apply_strategy(model, "ramp", 0.6, spread=0.2) == pytest.approx([0.5, 0.6, 0.7])
    with pytest.raises(ValueError, match="strategy='bogus'.*adaptive"):
        crisp.apply_strategy(model, "bogus", 0.5)
    with pytest.raises(ValueError, match="calibration_batches"):
        crisp.apply_strategy(model, "adaptive", 0.5)
    with pytest.raises(ValueError, match=r"sparsity=1\.0"):
        crisp.apply_strategy(model, "uniform", 1.0)


def test_registry_is_pluggable():
    @crisp.register_strategy("first_layer_only")
    def first_layer_only(num_layers, sparsity):
        return [sparsity] + [0.0] * (num_layers - 1)

    try:
        assert crisp.apply_strategy(tiny_model("bert"), "first_layer_only", 0.4) == [0.4, 0.0, 0.0]
    finally:
        del crisp.STRATEGIES["first_layer_only"]


MY_STRATEGY = '''
import crisp


@crisp.register_strategy("last_layer_only", clips=True)
def last_layer_only(num_layers, sparsity, scale=1.0):
    return [0.0] * (num_layers - 1) + [min(0.95, sparsity * num_layers * scale)]
'''


def _my_strategy(tmp_path):
    (tmp_path / "my_strategies.py").write_text(MY_STRATEGY)
    (tmp_path / "my_conf" / "strategy").mkdir(parents=True)
    (tmp_path / "my_conf" / "strategy" / "last_layer_only.yaml").write_text(
        "name: last_layer_only\nmodule: my_strategies   # imported first: it registers the strategy\nscale: 1.0\n")
    return [f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "strategy=last_layer_only"], \
        {"PYTHONPATH": str(tmp_path)}


def test_a_strategy_registered_in_a_users_module_runs_from_the_command_line(tmp_path):
    from tests.conftest import run_crisp, smoke_overrides

    overrides, env = _my_strategy(tmp_path)
    proc = run_crisp(*smoke_overrides(tmp_path / "run"), *overrides, "sparsity=0.3", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["layers"]["configured"] == pytest.approx([0.0, 0.6])  # the tiny model's two layers
    assert record["strategy"] == "last_layer_only"


def test_a_users_strategy_is_checked_like_crisps_own(tmp_path):
    from tests.conftest import run_crisp, smoke_overrides

    overrides, env = _my_strategy(tmp_path)
    proc = run_crisp(*smoke_overrides(tmp_path / "run"), *overrides, "sparsity=0.3", "+strategy.spread=2", env=env)
    assert proc.returncode == 2 and "strategy.spread=2 is not allowed" in proc.stderr and "scale" in proc.stderr
    proc = run_crisp(*smoke_overrides(tmp_path / "run"), *overrides, "sparsity=0.97", env=env)
    assert proc.returncode == 2 and "sparsity=0.97 is not allowed" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_users_strategy_trains_in_a_lockstep_grid_under_both_worker_starts(tmp_path):
    from tests.conftest import run_crisp, smoke_overrides

    overrides, env = _my_strategy(tmp_path)
    for start in ("fork", "exec"):
        out = tmp_path / start
        proc = run_crisp("-m", *smoke_overrides(out, sweep=True), *overrides, "sparsity=0,0.3", "seed=1,2",
                         "hydra/launcher=lockstep", f"hydra.launcher.worker_start={start}", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = {p.parent.name: json.loads(p.read_text()) for p in out.rglob("results.json")}
        assert sorted(found) == ["dense_seed1", "dense_seed2", "last_layer_only_s0.3_seed1",
                                 "last_layer_only_s0.3_seed2"]
        assert found["last_layer_only_s0.3_seed2"]["layers"]["configured"] == pytest.approx([0.0, 0.6])
