"""The built-in sparsifiers, each one function with the contract of :mod:`crisp.sparsity.registry`.

- ``topk``: the k highest scores per row (:mod:`crisp.sparsity.topk`; :func:`topk_fused` is its
  one-launch GPU kernel, which scales the raw scores itself);
- ``random``: the same number of keys, drawn uniformly among those the row may see, from each run's own
  stream (:mod:`crisp.sparsity.streams`): the control that tells sparsity from noise;
- ``topp``: nucleus attention, the smallest set of keys whose softmax mass reaches ``p = 1 - sparsity``;
- ``entmax``: α-entmax (``sparsifier.alpha``; 1.5 by default, 2 is sparsemax) through the ``entmax`` library.

Each keeps its kept keys' scores and gives the others -inf before a softmax (entmax's own mapping is
zero outside its support), so gradients flow through kept keys only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from crisp.sparsity import kernels, streams
from crisp.sparsity import topk as topk_rule
from crisp.sparsity.topk import MaskInfo


@dataclass(frozen=True)
class SparsifierCall:
    """What one attention call tells its sparsifier besides the scores, the mask and the parameter."""

    runs: int  # the batch's rows are this many equal blocks, one per run (1: a single run)
    masks: MaskInfo  # what this forward's layers derive from the mask once (the inverted mask, k per row)
    module: nn.Module  # the attention module
    params: Mapping[str, float | tuple[float, ...]] = field(default_factory=dict)  # the sparsifier's own keys

    @property
    def layer(self) -> int:
        """The layer's index in its model (:func:`crisp.set_sparsifier` sets it): a random draw's call site."""
        return getattr(self.module, "crisp_layer", 0)


# Small constant tensors by (values, dtype, device), made once: a CUDA graph's capture may not copy from the
# host, and captures them by address (as crisp.sparsity.topk's k tables).
_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant(values: float | tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    key = (values, dtype, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS[key]


def per_row(values: float | tuple[float, ...], batch: int, runs: int, device: torch.device) -> torch.Tensor | float:
    """A per-run tuple as a ``(batch, 1, 1, 1)`` tensor, each run's value over its block of rows; a float as is."""
    if not isinstance(values, tuple):
        return values
    return constant(values, device).repeat_interleave(batch // runs).view(batch, 1, 1, 1)


def topk(scores: torch.Tensor, valid: torch.Tensor | None, sparsity: float | tuple[float, ...],
         call: SparsifierCall) -> torch.Tensor:
    """The k best scores per row (ties by key position), the portable sort path."""
    drop = topk_rule.drop_mask(scores.detach(), call.masks, sparsity)
    return nn.functional.softmax(scores.masked_fill(drop, float("-inf")), dim=-1)


def topk_fused(scores: torch.Tensor, attention_mask: torch.Tensor | None, valid: torch.Tensor | None, scaling: float,
               sparsity: float | tuple[float, ...], runs: int) -> torch.Tensor | None:
    """Scale, mask, top-k and softmax in one launch on a GPU (:mod:`crisp.sparsity.kernels`); None elsewhere."""
    if not kernels.available(scores):
        return None
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        scores, scaling = scores * scaling + attention_mask, 1.0  # an additive mask may hold more than padding
    table = topk_rule.k_table(scores.size(-1), sparsity, scores.device)
    return kernels.topk_softmax(scores, valid, table, scaling, runs=runs)


def random_keys(scores: torch.Tensor, valid: torch.Tensor | None, sparsity: float | tuple[float, ...],
                call: SparsifierCall) -> torch.Tensor:
    """topk's k per row, the keys drawn uniformly among the valid ones: the k highest random priorities."""
    priorities = streams.priorities(scores.shape, scores.device, call.runs, call.layer)
    if call.masks.invalid is not None:
        priorities = priorities.masked_fill(call.masks.invalid, -1)  # below every draw: never kept
    drop = topk_rule.drop_mask(priorities, call.masks, sparsity)
    return nn.functional.softmax(scores.masked_fill(drop, float("-inf")), dim=-1)


def topp(scores: torch.Tensor, valid: torch.Tensor | None, sparsity: float | tuple[float, ...],
         call: SparsifierCall) -> torch.Tensor:
    """Keep the smallest set of keys whose softmax mass (float32) reaches ``p = 1 - sparsity``: keys in
    descending order of probability (ties by key position) while the mass before them is below p."""
    p = 1 - per_row(sparsity, scores.size(0), call.runs, scores.device)
    with torch.no_grad():
        dense = nn.functional.softmax(scores.float(), dim=-1)
        ranked, order = dense.sort(dim=-1, descending=True, stable=True)
        before = nn.functional.pad(ranked.cumsum(-1)[..., :-1], (1, 0))  # the mass ranked above each key
        keep = torch.empty_like(order, dtype=torch.bool).scatter_(-1, order, (before < p) | (p >= 1))
        if valid is not None:
            keep &= valid
    return nn.functional.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)


def _entmax_of(alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    import entmax as library  # imported on first use: a run of another sparsifier never loads it

    if alpha == 1.5:
        return lambda x: library.entmax15(x, dim=-1)
    if alpha == 2:
        return lambda x: library.sparsemax(x, dim=-1)
    return lambda x: library.entmax_bisect(x, alpha=constant(alpha, x.device, x.dtype), dim=-1)


def entmax(scores: torch.Tensor, valid: torch.Tensor | None, alpha: float | tuple[float, ...],
           call: SparsifierCall) -> torch.Tensor:
    """α-entmax over the masked scores in float32 (a masked key's lowest score gets zero); with one α per
    run, each run's block of rows through its own α (exact entmax15 and sparsemax where they apply)."""
    x = scores.float()
    if not isinstance(alpha, tuple) or len(set(alpha)) == 1:
        probs = _entmax_of(alpha[0] if isinstance(alpha, tuple) else alpha)(x)
    else:
        blocks = x.view(call.runs, -1, *x.shape[1:])
        probs = torch.empty_like(blocks)
        for value in dict.fromkeys(alpha):
            runs = constant(tuple(r for r, a in enumerate(alpha) if a == value), x.device, torch.int64)
            probs = probs.index_copy(0, runs, _entmax_of(value)(blocks.index_select(0, runs)))
        probs = probs.view_as(x)
    return probs.to(scores.dtype)
