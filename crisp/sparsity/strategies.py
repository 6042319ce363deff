"""Sparsity strategies: which sparsity each attention layer gets.

A strategy is a function ``(num_layers, sparsity, **params) -> list[float]`` in :data:`STRATEGIES`;
one that needs per-layer attention entropies measured on the dense model sets
``needs_entropy = True`` and receives them as ``entropy=``. Adding one = a function here (or
anywhere, with :func:`register_strategy`) and a yaml in ``conf/strategy/``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from crisp.sparsity import MAX_LAYER_SPARSITY  # noqa: E402 (re-exported)
from crisp.sparsity.layers import attention_stats, check_sparsity, configure, get_sparsity, set_sparsity

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a batch feeds the encoder
STRATEGIES: dict[str, Callable[..., list[float]]] = {}


def register_strategy(name: str, *, needs_entropy: bool = False):
    def decorate(fn):
        fn.needs_entropy = needs_entropy
        STRATEGIES[name] = fn
        return fn

    return decorate


def mean_preserving(offsets: Sequence[float], target: float, high: float = MAX_LAYER_SPARSITY) -> list[float]:
    """``clip(b + offsets, 0, high)`` with the shift ``b`` chosen so that the mean equals ``target``.

    Clipping is redistributed over the layers that are not clipped; order is preserved, so larger
    offsets never get less sparsity. Bisection: the mean is continuous and non-decreasing in b.
    """
    if not 0 <= target <= high:
        raise ValueError(f"sparsity={target!r} cannot be spread over layers each in [0, {high}]")
    offsets_t = torch.tensor(offsets, dtype=torch.float64)

    def values(b: float) -> torch.Tensor:
        return (b + offsets_t).clamp(0.0, high)

    lo, hi = -float(offsets_t.max()) - 1.0, high - float(offsets_t.min()) + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if values(mid).mean().item() < target:
            lo = mid
        else:
            hi = mid
    return values((lo + hi) / 2).tolist()


@register_strategy("uniform")
def uniform(num_layers: int, sparsity: float) -> list[float]:
    """Every layer gets ``sparsity``."""
    return [sparsity] * num_layers


@register_strategy("ramp")
def ramp(num_layers: int, sparsity: float, spread: float = 0.2) -> list[float]:
    """Linear in depth: the last layer gets ``spread`` more than the first (negative: less); mean = sparsity."""
    if num_layers == 1:
        return [sparsity]
    offsets = [spread * (i / (num_layers - 1) - 0.5) for i in range(num_layers)]
    return mean_preserving(offsets, sparsity)


@register_strategy("adaptive", needs_entropy=True)
def adaptive(num_layers: int, sparsity: float, entropy: Sequence[float], spread: float = 0.2) -> list[float]:
    """More sparsity for more peaked (lower-entropy) layers; non-increasing in entropy; mean = sparsity.

    Entropies are min-max scaled to [-1/2, 1/2] around their mean, so ``spread`` is the gap in
    sparsity between the most and the least peaked layer before clipping.
    """
    if len(entropy) != num_layers:
        raise ValueError(f"adaptive needs one entropy per layer: got {len(entropy)} for {num_layers} layers")
    h = torch.tensor(entropy, dtype=torch.float64)
    width = float(h.max() - h.min())
    if width == 0:
        return mean_preserving([0.0] * num_layers, sparsity)
    offsets = (spread * (h.mean() - h) / width).tolist()
    return mean_preserving(offsets, sparsity)


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
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not allowed: choose one of {sorted(STRATEGIES)}")
    sparsity = check_sparsity(sparsity)
    num_layers = len(get_sparsity(model))
    if sparsity == 0:
        return set_sparsity(model, [0.0] * num_layers)
    strategy = STRATEGIES[name]
    if strategy.needs_entropy:
        if entropy is None and calibration_batches is None:
            raise ValueError(f"strategy={name!r} needs calibration_batches to measure attention entropy")
        params["entropy"] = measure_entropy(model, calibration_batches) if entropy is None else list(entropy)
        model.crisp_calibration_entropy = params["entropy"]  # saved with the run's results
    return set_sparsity(model, strategy(num_layers, sparsity, **params))
