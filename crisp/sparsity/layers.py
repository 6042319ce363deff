"""The model-level API: per-layer sparsity, the sparsifier, switches and statistics of a model's attention layers.

``crisp.set_sparsity(model, 0.8)`` (or one value per layer), ``crisp.set_sparsifier(model, "random")``
(or ``crisp.configure(model, sparsifier="entmax", alpha=2.0)``), ``crisp.configure(model,
apply_in_eval=..., track_stats=...)``, ``crisp.attention_stats(model)`` after a forward, and
``crisp.prepare(model)``, which training calls before its first step. The layers are found through
the model's family (:mod:`crisp.sparsity.families`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from crisp.sparsity import registry
from crisp.sparsity.attention import NAME
from crisp.sparsity.families import attention_modules, check_reached, not_reached


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules that carry crisp's settings, of a model loaded with ``attn_implementation="crisp"``."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if config is not None and implementation != NAME:
        raise ValueError(
            f"model uses attn_implementation={implementation!r}; load it with attn_implementation='crisp' "
            "(or call model.set_attn_implementation('crisp')) so that sparsity takes effect"
        )
    modules = attention_modules(model)
    if not modules:
        raise not_reached(model, "no attention layer was found that dispatches through transformers' attention "
                                 "registry or a crisp adapter")
    return modules


def prepare(model: nn.Module) -> list[nn.Module]:
    """Make ``model``'s attention crisp's in every layer and prove it with a dry forward (training
    calls this before the first step: an encoder crisp cannot reach must not train dense unnoticed)."""
    modules = attention_layers(model)
    check_reached(model)
    return modules


def check_sparsity(value: object, key: str = "sparsity") -> float:
    """Return ``value`` as a float in [0, 1) or raise a ValueError naming key, value and range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value < 1:
        raise ValueError(f"{key}={value!r} is not allowed: it must be a number in [0, 1)")
    return float(value)


def set_sparsity(model: nn.Module, sparsity: float | Sequence[float]) -> list[float]:
    """Set every attention layer's sparsity from one float or a per-layer list; returns the values."""
    modules = attention_layers(model)
    if isinstance(sparsity, Sequence) and not isinstance(sparsity, str):
        if len(sparsity) != len(modules):
            raise ValueError(f"sparsity has {len(sparsity)} values but the model has {len(modules)} attention layers"
                             f"{_shared(model, modules)}")
        values = [check_sparsity(s, f"sparsity[{i}]") for i, s in enumerate(sparsity)]
    else:
        values = [check_sparsity(sparsity)] * len(modules)
    for module, value in zip(modules, values, strict=True):
        module.crisp_sparsity = value
    return values


def _shared(model: nn.Module, modules: list[nn.Module]) -> str:
    """Why a model has fewer attention modules than layers, when its layers share them in groups (ALBERT's
    ``num_hidden_groups``; a hybrid model's attention-free layers need no such word)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(getattr(config, "num_hidden_groups", None), int) and isinstance(layers, int) and \
            layers > len(modules):
        return (f" ({type(model).__name__}'s {layers} layers share {len(modules)} attention module"
                f"{'s' if len(modules) > 1 else ''}: give one sparsity per module, it applies to every layer "
                "that shares it; its statistics are one entry per module too)")
    return ""


def _check_param(name: str, key: str, spec: registry.Key, value: object) -> float | tuple[float, ...]:
    """A sparsifier's own key as a float, or a tuple of floats (one per lockstep run); ValueError names it."""
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not spec.check(float(v)):
            raise ValueError(f"sparsifier.{key}={value!r} is not allowed: sparsifier {name} takes {spec.allowed}")
    return tuple(float(v) for v in value) if isinstance(value, tuple) else float(value)


def set_sparsifier(model: nn.Module, name: str, **params: float | tuple[float, ...]) -> dict[str, object]:
    """Make ``name`` (see :mod:`crisp.sparsity.registry`) every layer's sparsifier, with its own keys
    (``alpha=2.0``; a tuple: one value per lockstep run) over its defaults; its default ``apply_in_eval``
    comes with it (``configure`` changes it). Returns the keys it set."""
    entry = registry.SPARSIFIERS.get(name)
    if entry is None:
        raise ValueError(f"sparsifier={name!r} is not allowed: choose one of {sorted(registry.SPARSIFIERS)}")
    unknown = sorted(set(params) - set(entry.keys))
    if unknown:
        raise ValueError(f"sparsifier.{unknown[0]}={params[unknown[0]]!r} is not allowed: sparsifier {name} "
                         f"has the keys {sorted(entry.keys) or 'none of its own'}")
    values = {key: _check_param(name, key, spec, params.get(key, spec.default)) for key, spec in entry.keys.items()}
    for layer, module in enumerate(attention_layers(model)):
        module.crisp_sparsifier, module.crisp_sparsifier_params = name, dict(values)
        module.crisp_apply_in_eval, module.crisp_layer = entry.apply_in_eval, layer
    return values


def configure(model: nn.Module, *, sparsifier: str | None = None, apply_in_eval: bool | None = None,
              track_stats: bool | None = None, **params: float | tuple[float, ...]) -> None:
    """Set the sparsifier (with its own keys, see :func:`set_sparsifier`), then switch sparsity in eval
    mode and per-forward statistics on or off for every layer."""
    if params and sparsifier is None:
        raise ValueError(f"{', '.join(sorted(params))}: a sparsifier's own keys come with it: "
                         "configure(model, sparsifier=..., ...)")
    if sparsifier is not None:
        set_sparsifier(model, sparsifier, **params)
    for module in attention_layers(model):
        if apply_in_eval is not None:
            module.crisp_apply_in_eval = bool(apply_in_eval)
        if track_stats is not None:
            module.crisp_track_stats = bool(track_stats)


def get_sparsity(model: nn.Module) -> list[float]:
    return [getattr(m, "crisp_sparsity", 0.0) for m in attention_layers(model)]


@dataclass(frozen=True)
class LayerStats:
    achieved_sparsity: float
    entropy: float


def attention_stats(model: nn.Module) -> list[LayerStats]:
    """Per layer: achieved sparsity and mean normalized entropy of the last forward that tracked stats."""
    modules = attention_layers(model)
    missing = [i for i, m in enumerate(modules) if getattr(m, "crisp_stats", None) is None]
    if missing:
        raise RuntimeError(f"no attention statistics yet for layers {missing}: run a forward pass with stats tracked")
    values = torch.stack([m.crisp_stats for m in modules]).tolist()  # one host sync for all layers
    return [LayerStats(achieved_sparsity=a, entropy=h) for a, h in values]
