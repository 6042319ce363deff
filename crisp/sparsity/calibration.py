"""Applying a strategy to a model: per-layer sparsity, calibrated on the dense model where the strategy asks.

:func:`apply_strategy` is ``crisp.apply_strategy``; :func:`measure_entropy` is the adaptive strategy's
calibration (each layer's mean normalized attention entropy of the *dense* model on a few batches).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from crisp.sparsity.layers import attention_stats, check_sparsity, configure, get_sparsity, set_sparsity
from crisp.sparsity.strategies import NOT_PARAMETERS, load_strategy

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a batch feeds the encoder


@torch.no_grad()
def measure_entropy(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> list[float]:
    """Mean normalized attention entropy per layer of the *dense* model over ``batches``."""
    saved = get_sparsity(model)
    was_training = model.training
    set_sparsity(model, 0.0)
    configure(model, track_stats=True)
    model.eval()
    device = next(model.parameters()).device
    totals, count = None, 0
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
            model(**inputs)
            layer_entropy = torch.tensor([s.entropy for s in attention_stats(model)], dtype=torch.float64)
            totals = layer_entropy if totals is None else totals + layer_entropy
            count += 1
    finally:
        set_sparsity(model, saved)
        model.train(was_training)
    if count == 0:
        raise ValueError("entropy calibration got no batches")
    return (totals / count).tolist()


def apply_strategy(
    model: nn.Module,
    name: str,
    sparsity: float,
    calibration_batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
    entropy: list[float] | None = None,
    **params,
) -> list[float]:
    """Set per-layer sparsity on ``model`` with strategy ``name``; returns the values it set.

    ``sparsity=0`` means dense whatever the strategy (no calibration runs). A strategy that needs the
    dense model's attention entropy measures it on ``calibration_batches``, unless it is given as
    ``entropy`` (measured already on this model and those batches).
    """
    strategy = load_strategy(name, params.pop("module", None))
    params = {k: v for k, v in params.items() if k not in NOT_PARAMETERS}
    sparsity = check_sparsity(sparsity)
    num_layers = len(get_sparsity(model))
    if sparsity == 0:
        return set_sparsity(model, [0.0] * num_layers)
    if strategy.needs_entropy:
        if entropy is None and calibration_batches is None:
            raise ValueError(f"strategy={name!r} needs calibration_batches to measure attention entropy")
        params["entropy"] = measure_entropy(model, calibration_batches) if entropy is None else list(entropy)
        model.crisp_calibration_entropy = params["entropy"]  # saved with the run's results
    return set_sparsity(model, strategy(num_layers, sparsity, **params))
