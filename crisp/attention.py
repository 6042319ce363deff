"""Top-k sparse attention, plugged into transformers' attention-function registry.

Any model whose attention modules dispatch through ``ALL_ATTENTION_FUNCTIONS`` (BERT, DistilBERT,
RoBERTa, ...) becomes sparse with ``attn_implementation="crisp"``: no modeling code is copied.

Per attention module, crisp keeps three attributes (set with :func:`set_sparsity` and
:func:`configure`): ``crisp_sparsity`` (float in [0, 1)), ``crisp_apply_in_eval`` (bool) and
``crisp_track_stats`` (bool). The semantics are those of DESIGN.md: for every valid query row with
``n`` valid keys, keep ``k = max(1, n - floor(s * n))`` keys with the highest pre-softmax scores,
ties broken by key position, and give every other key -inf.

A batch may hold several runs at once (crisp's lockstep training, ``crisp.lockstep``): the model is
then called with ``crisp_runs=RunRows(...)``, which transformers passes on to this function, the
batch's rows are one equal block per run, and each layer's ``crisp_sparsity`` is a tuple with one
value per run. Each row takes k from its own run's table; statistics are kept per run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from crisp import kernels

NAME = "crisp"
# floor(s * n) must not fall one short when s * n is an integer that floats round down (0.7 * 10).
_FLOOR_EPS = 1e-6


def kept_keys(n: torch.Tensor | int, sparsity: float) -> torch.Tensor | int:
    """Number of keys kept out of ``n`` valid keys at ``sparsity``: ``max(1, n - floor(s * n))``.

    For a tensor of counts it looks the answer up in a table computed on the host in float64, once
    per (length, sparsity, device): exact, and one gather on the device instead of float arithmetic.
    """
    if isinstance(n, int):
        return max(1, n - math.floor(n * sparsity + _FLOOR_EPS))
    return _k_table(int(n.max()), sparsity, n.device)[n]


# k per number of valid keys, by (sparsity, device): a process-wide cache of small constant tensors
# (8,192 entries per sparsity, or per tuple of per-run sparsities); CUDA graphs capture them by
# address, so an entry is never replaced while it is big enough.
_K_TABLES: dict[tuple[float | tuple[float, ...], torch.device], torch.Tensor] = {}
_MAX_KEYS = 8192


def _k_table(max_n: int, sparsity: float | tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``table[n]`` = k for ``n`` valid keys; for a tuple of per-run sparsities ``table[run, n]``."""
    size = max(_MAX_KEYS, max_n + 1)
    table = _K_TABLES.get((sparsity, device))
    if table is None or table.size(-1) < size:
        per_run = sparsity if isinstance(sparsity, tuple) else (sparsity,)
        table = torch.tensor([[kept_keys(i, s) for i in range(size)] for s in per_run], device=device)
        table = table if isinstance(sparsity, tuple) else table[0]
        _K_TABLES[(sparsity, device)] = table
    return table


def valid_key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean mask (True = key may be attended) from a boolean or additive float mask."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


class _MaskInfo:
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
            table = _k_table(self.num_keys, sparsity, self.device)
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
_LAST_MASK: list[_MaskInfo] = []


def _mask_info(valid: torch.Tensor | None, scores: torch.Tensor, runs: int) -> _MaskInfo:
    num_keys = scores.size(-1)
    if _LAST_MASK:
        info = _LAST_MASK[0]
        same = info.valid is valid and info.num_keys == num_keys and info.device == scores.device
        if same and info.runs == runs:
            return info
    info = _MaskInfo(valid, num_keys, scores.device, runs)
    _LAST_MASK[:] = [info]
    return info


def _drop_mask(scores: torch.Tensor, info: _MaskInfo, sparsity: float | tuple[float, ...]) -> torch.Tensor:
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
    return ~_drop_mask(scores, _MaskInfo(valid, scores.size(-1), scores.device), sparsity)


@dataclass
class RunRows:
    """A batch that holds several runs (``crisp_runs=`` in the model call): its rows are ``count``
    equal blocks, one per run. ``query_valid`` marks real tokens where packed rows also hold padding
    tokens (which attend to themselves only and are left out of the statistics); ``dropout(x, p)``
    draws each run's dropout mask from that run's own random stream."""

    count: int
    query_valid: torch.Tensor | None = None
    dropout: Callable[[torch.Tensor, float], torch.Tensor] | None = None


def _active_sparsity(module: nn.Module) -> float | tuple[float, ...]:
    """The layer's sparsity now: 0.0 (dense) when it does not apply, else a float or one per run."""
    sparsity = getattr(module, "crisp_sparsity", 0.0)
    if not module.training and not getattr(module, "crisp_apply_in_eval", True):
        return 0.0
    if isinstance(sparsity, tuple) and not any(sparsity):
        return 0.0
    return sparsity


@torch.no_grad()
def _record_stats(module: nn.Module, probs: torch.Tensor, valid: torch.Tensor | None, runs: RunRows | None) -> None:
    """Store [achieved sparsity, mean normalized entropy] over valid query rows, on the device
    (shape [2], or [runs, 2] for a batch of several runs).

    No host synchronisation happens here; :func:`attention_stats` reads the numbers later.
    """
    probs = probs.float()
    num_queries, num_keys = probs.shape[-2:]
    if valid is None:
        pairs = torch.ones_like(probs, dtype=torch.bool)
    else:
        pairs = valid.expand_as(probs)
        if runs is not None and runs.query_valid is not None:
            pairs = pairs & runs.query_valid[:, None, :, None]
        elif num_queries == num_keys:
            # a padded query row is a padded token: its own key is masked on the diagonal
            pairs = pairs & pairs.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    count = 1 if runs is None else runs.count
    zero = ((probs == 0) & pairs).view(count, -1).sum(-1)
    achieved = zero / pairs.reshape(count, -1).sum(-1).clamp_min(1)
    n = pairs.sum(-1)
    entropy = -torch.special.xlogy(probs, probs).masked_fill(~pairs, 0).sum(-1)
    rows = n > 1
    normalized = entropy / torch.log(n.clamp_min(2).float())
    mean_entropy = (normalized * rows).view(count, -1).sum(-1) / rows.view(count, -1).sum(-1).clamp_min(1)
    stats = torch.stack([achieved, mean_entropy], dim=-1)
    module.crisp_stats = stats[0] if runs is None else stats


def crisp_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    crisp_runs: RunRows | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with a top-k sparsifier; at sparsity 0 it computes exactly what eager does."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3))
    valid = valid_key_mask(attention_mask)
    sparsity = _active_sparsity(module)
    runs = 1 if crisp_runs is None else crisp_runs.count
    if isinstance(sparsity, tuple) and len(sparsity) != runs:
        raise ValueError(f"crisp_sparsity has {len(sparsity)} values for a batch of {runs} run(s)")
    if sparsity and kernels.available(scores):
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            scores, scaling = scores * scaling + attention_mask, 1.0  # an additive mask may hold more than padding
        # scale, mask, top-k and softmax in one launch on GPU
        table = _k_table(scores.size(-1), sparsity, scores.device)
        probs = kernels.topk_softmax(scores, valid, table, scaling, runs=runs)
    else:
        scores = scores * scaling
        info = _mask_info(valid, scores, runs)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                # the same number eager's additive mask puts there, so s=0 matches eager bit for bit
                scores = scores.masked_fill(info.invalid, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask
        if sparsity:
            scores = scores.masked_fill(_drop_mask(scores.detach(), info, sparsity), float("-inf"))
        probs = nn.functional.softmax(scores, dim=-1)
    if getattr(module, "crisp_track_stats", True):
        _record_stats(module, probs, valid, crisp_runs)
    if crisp_runs is not None and crisp_runs.dropout is not None and module.training and dropout > 0:
        probs = crisp_runs.dropout(probs, dropout)
    else:
        probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def register() -> None:
    """Register ``"crisp"`` with transformers (attention function and its mask format)."""
    AttentionInterface.register(NAME, crisp_attention_forward)
    # boolean masks (True = attend), materialised only when there is padding
    AttentionMaskInterface.register(NAME, sdpa_mask)


# ----------------------------------------------------------------------------------------------
# Model-level API


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` in depth order (those that call the attention function).

    They are the innermost modules whose class name ends in "Attention" and that carry the model
    config through which transformers dispatches to the registry.
    """
    found = []
    for module in model.modules():
        if not type(module).__name__.endswith("Attention") or not hasattr(module, "config"):
            continue
        inner = [m for m in module.modules() if m is not module and type(m).__name__.endswith("Attention")]
        if not inner:
            found.append(module)
    return found


def _require_crisp(model: nn.Module) -> list[nn.Module]:
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if config is not None and implementation != NAME:
        raise ValueError(
            f"model uses attn_implementation={implementation!r}; load it with attn_implementation='crisp' "
            "(or call model.set_attn_implementation('crisp')) so that sparsity takes effect"
        )
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"no attention modules found in {type(model).__name__}")
    return modules


def check_sparsity(value: object, key: str = "sparsity") -> float:
    """Return ``value`` as a float in [0, 1) or raise a ValueError naming key, value and range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value < 1:
        raise ValueError(f"{key}={value!r} is not allowed: it must be a number in [0, 1)")
    return float(value)


def set_sparsity(model: nn.Module, sparsity: float | Sequence[float]) -> list[float]:
    """Set every attention layer's sparsity from one float or a per-layer list; returns the values."""
    modules = _require_crisp(model)
    if isinstance(sparsity, Sequence) and not isinstance(sparsity, str):
        if len(sparsity) != len(modules):
            raise ValueError(f"sparsity has {len(sparsity)} values but the model has {len(modules)} attention layers")
        values = [check_sparsity(s, f"sparsity[{i}]") for i, s in enumerate(sparsity)]
    else:
        values = [check_sparsity(sparsity)] * len(modules)
    for module, value in zip(modules, values, strict=True):
        module.crisp_sparsity = value
    return values


def configure(model: nn.Module, *, apply_in_eval: bool | None = None, track_stats: bool | None = None) -> None:
    """Switch sparsity in eval mode and per-forward statistics on or off for every layer."""
    for module in _require_crisp(model):
        if apply_in_eval is not None:
            module.crisp_apply_in_eval = bool(apply_in_eval)
        if track_stats is not None:
            module.crisp_track_stats = bool(track_stats)


def get_sparsity(model: nn.Module) -> list[float]:
    return [getattr(m, "crisp_sparsity", 0.0) for m in _require_crisp(model)]


@dataclass(frozen=True)
class LayerStats:
    achieved_sparsity: float
    entropy: float


def attention_stats(model: nn.Module) -> list[LayerStats]:
    """Per layer: achieved sparsity and mean normalized entropy of the last forward that tracked stats."""
    modules = _require_crisp(model)
    missing = [i for i, m in enumerate(modules) if getattr(m, "crisp_stats", None) is None]
    if missing:
        raise RuntimeError(f"no attention statistics yet for layers {missing}: run a forward pass with stats tracked")
    values = torch.stack([m.crisp_stats for m in modules]).tolist()  # one host sync for all layers
    return [LayerStats(achieved_sparsity=a, entropy=h) for a, h in values]
