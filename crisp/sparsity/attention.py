"""crisp's attention function, registered with transformers' attention-function registry.

Any model whose attention modules dispatch through ``ALL_ATTENTION_FUNCTIONS`` (BERT, DistilBERT,
RoBERTa, ...) runs it with ``attn_implementation="crisp"``: no modeling code is copied; an encoder
whose attention is computed inline reaches it through its family's adapter
(:mod:`crisp.sparsity.families`).

What each query row may see (the mask, ``is_causal``, grouped key/value heads) is made explicit first
(:mod:`crisp.sparsity.visibility`); a row's ``n`` for top-k and the statistics counts those keys.
Per attention module it reads these attributes (set by :mod:`crisp.sparsity.layers`):
``crisp_sparsity`` (a float in [0, 1), or one per run), ``crisp_apply_in_eval``,
``crisp_track_stats``, and ``crisp_sparsifier`` with ``crisp_sparsifier_params`` (which sparsifier of
:mod:`crisp.sparsity.registry` turns the scores into probabilities, and its own keys; top-k, with
:mod:`crisp.sparsity.topk`'s semantics, when unset). A batch may hold several runs at once (lockstep
training): inside :func:`batch_of_runs` the batch's rows are one equal block per run and each row takes
its parameter (k from its sparsity) from its own run; statistics are kept per run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from crisp.sparsity import registry, saving, topk, visibility
from crisp.sparsity.sparsifiers import SparsifierCall

NAME = saving.IMPLEMENTATION  # "crisp"


@dataclass
class RunRows:
    """A batch that holds several runs: its rows are ``count`` equal blocks, one per run.
    ``query_valid`` marks real tokens where packed rows also hold padding tokens (which attend to
    themselves only and are left out of the statistics); ``dropout(x, p)`` draws each run's dropout
    mask from that run's own random stream."""

    count: int
    query_valid: torch.Tensor | None = None
    dropout: Callable[[torch.Tensor, float], torch.Tensor] | None = None


# The batch's runs reach the attention function by context, not by keyword: not every encoder's
# forward passes its keywords down to its attention (MPNet's does not).
_RUNS: ContextVar[RunRows | None] = ContextVar("crisp_runs", default=None)
# The attention modules that ran crisp's function during a probe (see :func:`probe_reached`).
_PROBE: ContextVar[set[int] | None] = ContextVar("crisp_probe", default=None)


@contextmanager
def batch_of_runs(runs: RunRows) -> Iterator[None]:
    """Every crisp attention call inside takes its rows as ``runs`` (lockstep training)."""
    token = _RUNS.set(runs)
    try:
        yield
    finally:
        _RUNS.reset(token)


@contextmanager
def probe_reached() -> Iterator[set[int]]:
    """Collects the ids of the modules whose attention went through crisp's function inside."""
    reached: set[int] = set()
    token = _PROBE.set(reached)
    try:
        yield reached
    finally:
        _PROBE.reset(token)


def _active_parameter(module: nn.Module, sparsifier: registry.Sparsifier) -> tuple[bool, object]:
    """Whether the layer's sparsifier applies now (else: dense), and its parameter: the layer's sparsity
    or the sparsifier's own (see :mod:`crisp.sparsity.registry`), a float or one per run."""
    if not module.training and not getattr(module, "crisp_apply_in_eval", True):
        return False, None
    if sparsifier.uses_sparsity:
        sparsity = getattr(module, "crisp_sparsity", 0.0)
        return bool(any(sparsity) if isinstance(sparsity, tuple) else sparsity), sparsity
    return True, None if sparsifier.parameter is None else _params(module, sparsifier)[sparsifier.parameter]


def _params(module: nn.Module, sparsifier: registry.Sparsifier) -> dict:
    """The sparsifier's own keys on this layer (its registered defaults where none were set)."""
    return getattr(module, "crisp_sparsifier_params", None) or sparsifier.defaults()


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


def _visible_keys(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, kwargs: dict):
    """The mask of the keys each row may see (causality made explicit where it came as ``is_causal``, a
    position bias folded in as part of an additive mask) and one key/value head per query head."""
    visibility.refuse_unsupported(module, kwargs)
    if visibility.is_causal(module, query, attention_mask, kwargs):
        attention_mask = visibility.causal_mask(query.size(2), key.size(2), query.device)
    if kwargs.get("position_bias") is not None:
        attention_mask = visibility.with_position_bias(attention_mask, kwargs["position_bias"])
    return (attention_mask, *visibility.shared_heads(query, key, value))


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
    """Eager attention with the layer's sparsifier; where it does not apply (sparsity 0) exactly what eager does."""
    crisp_runs = crisp_runs if crisp_runs is not None else _RUNS.get()
    probe = _PROBE.get()
    if probe is not None:
        probe.add(id(module))
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    attention_mask, key, value = _visible_keys(module, query, key, value, attention_mask, kwargs)
    scores = torch.matmul(query, key.transpose(2, 3))
    if kwargs.get("softcap") is not None:  # Gemma-2's cap on the scaled scores, before the mask (as eager)
        scores, scaling = torch.tanh(scores * (scaling / kwargs["softcap"])) * kwargs["softcap"], 1.0
    valid = topk.valid_key_mask(attention_mask)
    sparsifier = registry.SPARSIFIERS[getattr(module, "crisp_sparsifier", registry.DEFAULT)]
    active, parameter = _active_parameter(module, sparsifier)
    runs = 1 if crisp_runs is None else crisp_runs.count
    if isinstance(parameter, tuple) and len(parameter) != runs:
        raise ValueError(f"{sparsifier.parameter_name()} has {len(parameter)} values for a batch of {runs} run(s)")
    # the keys a sparsifier chooses from; statistics keep to the keys a row may see (`valid`)
    selectable = visibility.selectable(valid) if active else valid
    probs = None
    if active and sparsifier.run_fused is not None:  # topk: scale, mask, top-k and softmax in one launch on GPU
        probs = sparsifier.run_fused(scores, attention_mask, selectable, scaling, parameter, runs)
    if probs is None:
        scores = scores * scaling
        info = topk.mask_info(selectable, scores, runs)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                # the same number eager's additive mask puts there, so s=0 matches eager bit for bit
                scores = scores.masked_fill(info.invalid, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask
        if active:
            call = SparsifierCall(runs, info, module, _params(module, sparsifier))
            probs = sparsifier.run(scores, valid, parameter, call)
        else:
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
    """Register ``"crisp"`` with transformers (attention function and its mask format), and have a model saved
    by ``crisp.save_pretrained`` come back with its settings (:mod:`crisp.sparsity.saving`)."""
    AttentionInterface.register(NAME, crisp_attention_forward)
    # boolean masks (True = attend): causal ones always materialised; see crisp.sparsity.visibility
    AttentionMaskInterface.register(NAME, visibility.mask_for)
    if not getattr(PreTrainedModel.post_init, "crisp_restores", False):
        PreTrainedModel.post_init = saving.restore_on_init(PreTrainedModel.post_init)


register()
