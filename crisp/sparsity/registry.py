"""The sparsifier registry: each choice's function, and what a config check needs to know of it.

A sparsifier turns one attention call's scores into probabilities. Every choice has one contract::

    function(scores, valid, parameter, call) -> probs

- ``scores``: ``(batch, heads, queries, keys)``, after scaling, masks and biases (a key a row may not
  see holds the mask's value: the dtype's lowest, or the additive mask's);
- ``valid``: boolean, broadcasts to ``scores``, True where the row may see the key; None: every key;
- ``parameter``: the layer's strength, a float, or a tuple with one per run when the batch holds several
  lockstep runs (its rows are then ``call.runs`` equal blocks, one per run). For a sparsifier that
  ``uses_sparsity`` it is the layer's sparsity (what a strategy gave the layer); otherwise the value of
  its own key named ``parameter`` (entmax's ``alpha``), or None when it has none;
- ``call``: :class:`crisp.sparsity.sparsifiers.SparsifierCall` (the number of runs, the mask's derived
  tensors, the attention module, the sparsifier's own keys);
- ``probs``: the attention probabilities, zero for every key dropped; gradients flow through kept keys only.

The attention function calls it only where the sparsifier applies (not at sparsity 0, not in evaluation
when ``apply_in_eval`` is off); the statistics (achieved sparsity, entropy) are recorded from ``probs``
by the caller, the same for every choice.

This module imports no torch: :mod:`crisp.core.config` checks a config against :data:`SPARSIFIERS`
within a second. Built-in functions are named by ``"module:attribute"`` and imported on first use.
A sparsifier of your own = one function registered here (:func:`register_sparsifier`) and one yaml
in ``conf/sparsifier/`` whose ``module`` key names the module that registers it.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

DEFAULT = "topk"
# keys of every choice's yaml besides its own
COMMON_KEYS = ("name", "module", "apply_in_eval", "stats_every_n_steps")


def _finite(value: float) -> bool:
    return math.isfinite(value)


@dataclass(frozen=True)
class Key:
    """One of a sparsifier's own config keys (``sparsifier.<key>``): its default and allowed values."""

    default: float
    check: Callable[[float], bool] = _finite
    allowed: str = "a finite number"


@dataclass
class Sparsifier:
    """A registered choice: its function and the metadata config checks read without importing it."""

    name: str
    function: Callable | str
    uses_sparsity: bool = True  # `sparsity` (a strategy's per-layer values) sets its strength
    apply_in_eval: bool = True  # its default for sparsifier.apply_in_eval
    keys: Mapping[str, Key] = field(default_factory=dict)  # its own keys, sparsifier.<key>
    parameter: str | None = None  # the own key handed to the function as `parameter` (else sparsity or None)
    # a fast path that takes the raw scores and the scaling still to apply (topk's one-launch GPU kernel):
    # fused(raw_scores, attention_mask, valid, scaling, parameter, runs) -> probs, or None where it cannot
    fused: Callable | str | None = None

    @functools.cached_property
    def run(self) -> Callable:
        return _load(self.function)

    @functools.cached_property
    def run_fused(self) -> Callable | None:
        return None if self.fused is None else _load(self.fused)

    def parameter_name(self) -> str | None:
        return "sparsity" if self.uses_sparsity else self.parameter

    def defaults(self) -> dict[str, float]:
        return {key: spec.default for key, spec in self.keys.items()}


def _load(function: Callable | str) -> Callable:
    if callable(function):
        return function
    module, _, attribute = function.partition(":")
    return getattr(importlib.import_module(module), attribute)


SPARSIFIERS: dict[str, Sparsifier] = {}


def register_sparsifier(name: str, function: Callable | str | None = None, *, uses_sparsity: bool = True,
                        apply_in_eval: bool = True, keys: Mapping[str, Key | float] | None = None,
                        parameter: str | None = None, fused: Callable | str | None = None):
    """Register ``function`` as the sparsifier ``name`` (also as a decorator: ``@register_sparsifier("mine")``).

    ``keys`` are its own config keys (a :class:`Key`, or a default number for any finite value);
    ``parameter`` names the one of them the function receives as its per-layer ``parameter`` (a
    sparsifier that does not use sparsity only).
    """
    own = {key: spec if isinstance(spec, Key) else Key(float(spec)) for key, spec in (keys or {}).items()}
    clash = sorted(set(own) & {*COMMON_KEYS, "sparsity"})
    if clash:
        raise ValueError(f"sparsifier {name!r}: its own keys {clash} clash with the keys every sparsifier has")
    if parameter is not None and (uses_sparsity or parameter not in own):
        raise ValueError(f"sparsifier {name!r}: parameter={parameter!r} must be one of its own keys {sorted(own)}, "
                         "for a sparsifier that does not use sparsity")

    def add(fn: Callable | str) -> Callable | str:
        SPARSIFIERS[name] = Sparsifier(name, fn, uses_sparsity, apply_in_eval, own, parameter, fused)
        return fn

    return add if function is None else add(function)


def lookup(name: str, module: str | None = None) -> Sparsifier | None:
    """The sparsifier ``name``, importing ``module`` first (where a user's registers it) if it is not known yet."""
    if name not in SPARSIFIERS and module:
        importlib.import_module(module)
    return SPARSIFIERS.get(name)


_HERE = "crisp.sparsity.sparsifiers"
register_sparsifier(DEFAULT, f"{_HERE}:topk", fused=f"{_HERE}:topk_fused")
register_sparsifier("random", f"{_HERE}:random_keys", apply_in_eval=False)
register_sparsifier("topp", f"{_HERE}:topp")
register_sparsifier("entmax", f"{_HERE}:entmax", uses_sparsity=False, parameter="alpha",
                    keys={"alpha": Key(1.5, lambda a: math.isfinite(a) and a > 1, "a number > 1 (2 is sparsemax)")})
