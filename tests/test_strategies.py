"""Strategies: per-layer values, mean preservation, adaptive's monotonicity (crisp/sparsity/strategies.py)."""

from __future__ import annotations

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
