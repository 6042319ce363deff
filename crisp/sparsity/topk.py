"""Exact top-k: how many keys each query row keeps, and which (the portable sort path).

For a row with ``n`` valid keys at sparsity ``s``, ``k = max(1, n - floor(s * n))`` keys survive: the k
highest scores, ties broken by key position (a stable descending sort), so exactly k survive even where
bf16 makes scores collide. Padding never survives. The fused GPU kernel (:mod:`crisp.sparsity.kernels`)
computes the same mask and is tested against this one.
"""

from __future__ import annotations

import functools
import math

import torch

# floor(s * n) must not fall one short when s * n is an integer that floats round down (0.7 * 10).
_FLOOR_EPS = 1e-6


def kept_keys(n: torch.Tensor | int, sparsity: float) -> torch.Tensor | int:
    """Number of keys kept out of ``n`` valid keys at ``sparsity``: ``max(1, n - floor(s * n))``.

    For a tensor of counts it looks the answer up in a table computed on the host in float64, once
    per (length, sparsity, device): exact, and one gather on the device instead of float arithmetic.
    """
    if isinstance(n, int):
        return max(1, n - math.floor(n * sparsity + _FLOOR_EPS))
    return k_table(int(n.max()), sparsity, n.device)[n]


# k per number of valid keys, by (sparsity, device): a process-wide cache of small constant tensors
# (8,192 entries per sparsity, or per tuple of per-run sparsities); CUDA graphs capture them by
# address, so an entry is never replaced while it is big enough.
_K_TABLES: dict[tuple[float | tuple[float, ...], torch.device], torch.Tensor] = {}
_MAX_KEYS = 8192


def k_table(max_n: int, sparsity: float | tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``table[n]`` = k for ``n`` valid keys; for a tuple of per-run sparsities ``table[run, n]``."""
    size = max(_MAX_KEYS, max_n + 1)
    table = _K_TABLES.get((sparsity, device))
    if table is None or table.size(-1) < size:
        per_run = sparsity if isinstance(sparsity, tuple) else (sparsity,)
        table = torch.tensor([[kept_keys(i, s) for i in range(size)] for s in per_run], device=device)
        table = table if isinstance(sparsity, tuple) else table[0]
        _K_TABLES[(sparsity, device)] = table
    return table


# an additive mask at or below this removes a key: exp(-1e4) is 0 in every float format. Older modeling code
# masks with -10000 rather than the dtype's minimum; a position bias never comes near it.
_MASKED = -1e4


def valid_key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean mask (True = key may be attended) from a boolean or additive float mask."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > _MASKED


class MaskInfo:
    """What every layer of one forward derives from the same mask, computed once per forward.

    transformers hands all layers the same mask object, so crisp keeps the last one's derived
    tensors (the inverted mask, k per row for each sparsity) instead of recomputing them per layer:
    fewer kernel launches in a launch-bound training step.
    """

    def __init__(self, valid: torch.Tensor | None, num_keys: int, device: torch.device, runs: int = 1):
        self.valid, self.num_keys, self.device, self.runs = valid, num_keys, device, runs
        self.invalid = None if valid is None else ~valid
        self._k: dict[float | tuple[float, ...], torch.Tensor | int] = {}
        self._drop_by_rank: dict[float | tuple[float, ...], torch.Tensor] = {}

    @functools.cached_property
    def positions(self) -> torch.Tensor:  # only the sort path needs it: no launch for dense or fused layers
        return torch.arange(self.num_keys, device=self.device)

    def k(self, sparsity: float | tuple[float, ...], batch: int) -> torch.Tensor | int:
        if sparsity not in self._k:
            table = k_table(self.num_keys, sparsity, self.device)
            n = self.num_keys if self.valid is None else self.valid.sum(-1, keepdim=True)
            if isinstance(sparsity, tuple):  # one table row per run, one block of batch rows per run
                run = torch.arange(batch, device=self.device) // (batch // self.runs)
                self._k[sparsity] = table[run.view(-1, 1, 1, 1), n]
            else:
                self._k[sparsity] = kept_keys(n, sparsity) if self.valid is None else table[n]
        return self._k[sparsity]

    def drop_by_rank(self, sparsity: float | tuple[float, ...], batch: int) -> torch.Tensor:
        """True at every rank (position in a row's descending order) that is dropped: rank >= k."""
        if sparsity not in self._drop_by_rank:
            self._drop_by_rank[sparsity] = self.positions >= self.k(sparsity, batch)
        return self._drop_by_rank[sparsity]


# The derived tensors of the last mask seen, shared by the layers of one forward. It assumes that
# the layers of one forward run one after another (true for these encoders): a different mask
# object, length, device or run count simply replaces it.
_LAST_MASK: list[MaskInfo] = []


def mask_info(valid: torch.Tensor | None, scores: torch.Tensor, runs: int) -> MaskInfo:
    num_keys = scores.size(-1)
    if _LAST_MASK:
        info = _LAST_MASK[0]
        same = info.valid is valid and info.num_keys == num_keys and info.device == scores.device
        if same and info.runs == runs:
            return info
    info = MaskInfo(valid, num_keys, scores.device, runs)
    _LAST_MASK[:] = [info]
    return info


def drop_mask(scores: torch.Tensor, info: MaskInfo, sparsity: float | tuple[float, ...]) -> torch.Tensor:
    """True for every key that must get -inf: all but the k best per row, and padding."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    # the key at order[j] has rank j: scatter "rank j is dropped" back to the key's position
    dropped = info.drop_by_rank(sparsity, scores.size(0)).expand_as(order)
    drop = torch.empty_like(order, dtype=torch.bool).scatter_(-1, order, dropped)
    return drop if info.invalid is None else drop.logical_or_(info.invalid)


def topk_keep_mask(scores: torch.Tensor, valid: torch.Tensor | None, sparsity: float) -> torch.Tensor:
    """Boolean mask with exactly k kept keys per query row (see :func:`kept_keys`).

    Ties are broken by key position (a stable descending sort), so exactly k keys survive even
    when bf16 scores collide. Padding keys never survive.
    """
    return ~drop_mask(scores, MaskInfo(valid, scores.size(-1), scores.device), sparsity)
