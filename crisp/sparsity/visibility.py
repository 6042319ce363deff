"""Which keys each query row may see, and with which heads: what crisp's attention function is handed, made explicit.

transformers tells an attention function what a row may see in three ways, and crisp honours each as the model's
own eager attention does:

- the mask (padding, a causal prefix, a local window), built by the mask function registered for the
  implementation. crisp's (:func:`mask_for`) is sdpa's boolean mask, except that a causal mask is always
  materialised: sdpa's may be left out (``None``) for an unpadded causal batch, to be applied by
  ``scaled_dot_product_attention(is_causal=True)``, which crisp's function does not call. Until
  ``crisp.prepare`` has seen every attention of a model run crisp's function, the model gets the eager
  (additive) mask instead, the format its own code expects where its attention is inline: a model crisp cannot
  reach runs its stock attention with the right mask, never a boolean mask added as numbers;
- ``is_causal`` (the call's keyword, else the module's attribute) where no mask comes at all: a model that
  builds its masks without transformers' mask functions may leave causality to the attention;
- ``num_key_value_groups``: grouped-query attention shares each key/value head among that many query heads
  (eager's ``repeat_kv``).

A row's ``n`` for top-k and the statistics is then the number of keys its mask lets it see.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import sdpa_mask

from crisp.sparsity.errors import AttentionNotReached

# attention keywords that change what a row's probabilities are, and that crisp does not implement
_UNSUPPORTED = {"s_aux": "attention sinks", "sinks": "attention sinks"}


def shared_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value with one head per query head: grouped key/value heads repeated as eager repeats them."""
    groups = query.size(1) // key.size(1)
    if groups * key.size(1) != query.size(1):
        raise ValueError(f"{query.size(1)} query heads cannot share {key.size(1)} key/value heads")
    return repeat_kv(key, groups), repeat_kv(value, groups)


def refuse_unsupported(module: nn.Module, kwargs: dict) -> None:
    """Raise :class:`AttentionNotReached` for an attention that passes what crisp's top-k does not implement."""
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise AttentionNotReached(f"{type(module).__name__} passes {name} ({what}) to its attention function: "
                                      "crisp's top-k does not implement them")


def is_causal(module: nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
    """Whether causality is left to the attention function: no mask came, the call or the module says causal,
    and there is more than one query (a single query sees its whole cache), as sdpa decides it. A module that
    does not say is not causal: eager attention, crisp's reference, applies no causality of its own."""
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", False)
    return attention_mask is None and bool(causal) and query.size(2) > 1


# per device, one lower-triangular mask at least as large as any asked for (a larger one replaces it: a captured
# CUDA graph's view keeps its own storage alive), and the last view asked for, so that every layer of a forward
# gets the same mask object (crisp.sparsity.topk keeps what it derives from a mask by the mask's identity)
_CAUSAL: dict[torch.device, torch.Tensor] = {}
_LAST_CAUSAL: list[tuple[int, int, torch.device, torch.Tensor]] = []


def causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, queries, keys]``, True where key j <= query i (upper-left aligned, as sdpa's ``is_causal``)."""
    if _LAST_CAUSAL and _LAST_CAUSAL[0][:3] == (queries, keys, device):
        return _LAST_CAUSAL[0][3]
    base = _CAUSAL.get(device)
    if base is None or base.size(0) < max(queries, keys):
        size = max(128, 1 << (max(queries, keys) - 1).bit_length())
        base = _CAUSAL[device] = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    view = base[:queries, :keys].view(1, 1, queries, keys)
    _LAST_CAUSAL[:] = [(queries, keys, device, view)]
    return view


def with_position_bias(attention_mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """One additive mask: ``bias`` on the keys a row may see, the dtype's minimum elsewhere (T5-style biases)."""
    if attention_mask is None:
        return bias
    if attention_mask.dtype == torch.bool:
        return bias.masked_fill(~attention_mask, torch.finfo(bias.dtype).min)
    return bias + attention_mask


# the config classes of models whose every attention has been seen to run crisp's function (crisp.prepare)
_REACHED: set[type] = set()


def reached(model: nn.Module) -> None:
    """Record that every attention of ``model`` runs crisp's function: its configs' models read crisp's
    boolean masks from now on."""
    _REACHED.update(type(m.config) for m in model.modules() if isinstance(getattr(m, "config", None),
                                                                          PretrainedConfig))


def mask_for(*args, config=None, **kwargs) -> torch.Tensor | None:
    """crisp's mask function (``AttentionMaskInterface``): sdpa's boolean mask with causality always in it for a
    model crisp has reached; eager's additive mask for any other, whose attention may be its own inline code
    (crisp's function reads either)."""
    if type(config) not in _REACHED:
        return _additive_mask(*args, **kwargs)
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _additive_mask(*args, dtype: torch.dtype = torch.float32, **kwargs) -> torch.Tensor | None:
    """Eager's additive mask (0 where a key takes part, the dtype's lowest elsewhere), made on the mask's own
    device: transformers' ``eager_mask`` copies a host scalar, which a CUDA graph's capture refuses."""
    kwargs["allow_is_causal_skip"] = False
    mask = sdpa_mask(*args, **kwargs)
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


# the last mask's selectable keys: every layer of a forward gets the same mask object
_LAST_SELECTABLE: list[tuple[torch.Tensor, torch.Tensor]] = []


def selectable(valid: torch.Tensor | None) -> torch.Tensor | None:
    """The keys top-k may choose from: the visible ones, or every key for a row that may see none (a padding
    query under a mask that also masks padded queries, or outside every window). Eager gives such a row a
    uniform softmax over all keys; keeping none would give it 0/0 = NaN, which the next layer's ``probs @ value``
    carries into every row (0 * NaN is NaN)."""
    if valid is None:
        return None
    if _LAST_SELECTABLE and _LAST_SELECTABLE[0][0] is valid:
        return _LAST_SELECTABLE[0][1]
    blind = ~valid.any(-1, keepdim=True)
    result = valid | blind
    _LAST_SELECTABLE[:] = [(valid, result)]
    return result
