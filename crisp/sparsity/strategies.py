"""Sparsity strategies: which sparsity each attention layer gets (the registry the config checks read).

A strategy is a function ``(num_layers, sparsity, **params) -> list[float]`` in :data:`STRATEGIES`,
registered with :func:`register_strategy`, which records what the config checks need to know of it
without running it: whether it needs per-layer attention entropies measured on the dense model
(``needs_entropy``: it then receives them as ``entropy=``) and whether it spreads sparsity over layers
clipped to [0, :data:`MAX_LAYER_SPARSITY`] (``clips``: the mean it can reach is capped there too).
Adding one = a registered function (here, or in a module of your own that a strategy yaml names with
``module:``) and a yaml in ``conf/strategy/`` (or in a config folder of your own on ``hydra.searchpath``).

This module imports no torch: ``python -m crisp.run`` checks a strategy's name, parameters and range
against it before anything heavy loads. Applying a strategy to a model is :mod:`crisp.sparsity.calibration`'s.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence

from crisp.sparsity import MAX_LAYER_SPARSITY

STRATEGIES: dict[str, Callable[..., list[float]]] = {}
# keys of a strategy's config that are not parameters of its function
NOT_PARAMETERS = ("name", "module")


def register_strategy(name: str, *, needs_entropy: bool = False, clips: bool = False):
    """Register ``fn`` as strategy ``name`` (see the module for ``needs_entropy`` and ``clips``)."""

    def decorate(fn):
        fn.needs_entropy, fn.clips = needs_entropy, clips
        STRATEGIES[name] = fn
        return fn

    return decorate


def load_strategy(name: str, module: str | None = None) -> Callable[..., list[float]]:
    """The strategy registered as ``name``, importing ``module`` first (a user's module that registers it).

    Raises ValueError naming the strategy and what is registered."""
    if module:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"strategy.module={module!r} cannot be imported ({err}): it must be a module on the "
                             "Python path that registers the strategy with crisp.register_strategy") from None
    if name not in STRATEGIES:
        where = f" (module {module} registers none by that name)" if module else ""
        raise ValueError(f"strategy={name!r} is not allowed{where}: choose one of {sorted(STRATEGIES)}, or register "
                         "your own with crisp.register_strategy and name its module in the yaml (module: ...)")
    return STRATEGIES[name]


def strategy_parameters(fn: Callable[..., list[float]]) -> set[str] | None:
    """The config keys a strategy takes (its function's keyword parameters); None: any (it takes ``**kwargs``)."""
    params = list(inspect.signature(fn).parameters.values())[2:]  # after num_layers, sparsity
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name != "entropy"}


def mean_preserving(offsets: Sequence[float], target: float, high: float = MAX_LAYER_SPARSITY) -> list[float]:
    """``clip(b + offsets, 0, high)`` with the shift ``b`` chosen so that the mean equals ``target``.

    Clipping is redistributed over the layers that are not clipped; order is preserved, so larger
    offsets never get less sparsity. Bisection: the mean is continuous and non-decreasing in b.
    """
    if not 0 <= target <= high:
        raise ValueError(f"sparsity={target!r} cannot be spread over layers each in [0, {high}]")
    import torch  # here: the registry above loads without it

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


@register_strategy("ramp", clips=True)
def ramp(num_layers: int, sparsity: float, spread: float = 0.2) -> list[float]:
    """Linear in depth: the last layer gets ``spread`` more than the first (negative: less); mean = sparsity."""
    if num_layers == 1:
        return [sparsity]
    offsets = [spread * (i / (num_layers - 1) - 0.5) for i in range(num_layers)]
    return mean_preserving(offsets, sparsity)


@register_strategy("adaptive", needs_entropy=True, clips=True)
def adaptive(num_layers: int, sparsity: float, entropy: Sequence[float], spread: float = 0.2) -> list[float]:
    """More sparsity for more peaked (lower-entropy) layers; non-increasing in entropy; mean = sparsity.

    Entropies are min-max scaled to [-1/2, 1/2] around their mean, so ``spread`` is the gap in
    sparsity between the most and the least peaked layer before clipping.
    """
    if len(entropy) != num_layers:
        raise ValueError(f"adaptive needs one entropy per layer: got {len(entropy)} for {num_layers} layers")
    import torch

    h = torch.tensor(entropy, dtype=torch.float64)
    width = float(h.max() - h.min())
    if width == 0:
        return mean_preserving([0.0] * num_layers, sparsity)
    offsets = (spread * (h.mean() - h) / width).tolist()
    return mean_preserving(offsets, sparsity)


