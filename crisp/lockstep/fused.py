"""One model that holds R runs of one architecture: leaf modules swapped for fused versions.

transformers' modeling code runs unchanged on a batch whose rows are R equal blocks, one per run
(the run dimension folded into the batch). Only the modules that hold parameters or randomness
are swapped:

- ``Linear`` -> :class:`FusedLinear`: R weight matrices, one batched matmul over ``[R, tokens, in]``
  (stored transposed, ``[R, in, out]``: the matmul's weight gradient then comes out in the
  parameter's own layout and is not copied again for every parameter on every step);
- ``Embedding`` -> :class:`FusedEmbedding`: R tables, one lookup in their concatenation;
- ``LayerNorm`` -> :class:`FusedLayerNorm`: normalisation, then each run's scale and shift;
- ``Dropout`` -> :class:`RunDropout`: each run's mask from its own stream (:mod:`crisp.lockstep.dropout`).

Activations, reshapes and attention already work row by row; crisp's attention function gives each
run its own sparsity (``crisp_sparsity`` is then a tuple, see :class:`crisp.attention.RunRows`).
A fused parameter's first dimension is the run: ``param[r]`` is run r's tensor, shaped as in its
own model, so AdamW (elementwise) updates every run exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from crisp.lockstep.dropout import RunRandom


def _stack(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]))


class FusedLinear(nn.Module):
    transposed = ("weight",)  # run r's nn.Linear weight is weight[r].T

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.weight = _stack([m.weight.t() for m in linears])  # [R, in, out]
        self.bias = _stack([m.bias for m in linears]) if linears[0].bias is not None else None  # [R, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs, shape = self.weight.size(0), x.shape
        x = x.reshape(runs, -1, shape[-1])
        y = torch.bmm(x, self.weight) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)
        return y.reshape(*shape[:-1], -1)


class FusedEmbedding(nn.Module):
    def __init__(self, embeddings: Sequence[nn.Embedding]):
        super().__init__()
        self.weight = _stack([m.weight for m in embeddings])  # [R, vocab, dim]
        self.padding_idx = embeddings[0].padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        runs, vocab, dim = self.weight.shape
        offsets = torch.arange(runs, device=ids.device) * vocab
        per_run = ids.view(runs, -1)
        out = F.embedding(per_run + offsets[:, None], self.weight.view(runs * vocab, dim))
        if self.padding_idx is not None:
            # as nn.Embedding(padding_idx=...) does: the padding row gets no gradient from its tokens
            out = torch.where((per_run == self.padding_idx).unsqueeze(-1), out.detach(), out)
        return out.view(*ids.shape, dim)


class FusedLayerNorm(nn.Module):
    def __init__(self, norms: Sequence[nn.LayerNorm]):
        super().__init__()
        self.normalized_shape, self.eps = tuple(norms[0].normalized_shape), norms[0].eps
        self.weight = _stack([m.weight for m in norms])  # [R, dim]
        self.bias = _stack([m.bias for m in norms])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs, shape = self.weight.size(0), x.shape
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps).view(runs, -1, shape[-1])
        return torch.addcmul(self.bias.unsqueeze(1), y, self.weight.unsqueeze(1)).view(shape)


class RunDropout(nn.Module):
    def __init__(self, p: float, random: RunRandom):
        super().__init__()
        self.p, self.random = p, random

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.random.dropout(x, self.p) if self.training and self.p > 0 else x


class SentenceOutputs(nn.Module):
    """Wraps the base encoder for packed rows: the head gets each sentence's first token.

    Several sentences share a packed row, so ``hidden[:, 0]`` (what the classification heads take)
    would be one per row. This hands the head one ``[sentences, 1, dim]`` state per sentence, picked
    by ``crisp_first`` (flat token positions); a pooler (BERT's) runs on those instead.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.pooler = getattr(base, "pooler", None)
        if self.pooler is not None:
            base.pooler = None

    def forward(self, *args, crisp_first: torch.Tensor | None = None, **kwargs):
        out = self.base(*args, **kwargs)
        if crisp_first is not None:
            first = out.last_hidden_state.flatten(0, 1)[crisp_first].unsqueeze(1)
            out["last_hidden_state"] = first
            if self.pooler is not None:
                out["pooler_output"] = self.pooler(first)
        return out


_FUSED = {nn.Linear: FusedLinear, nn.Embedding: FusedEmbedding, nn.LayerNorm: FusedLayerNorm}


def fuse(models: Sequence[nn.Module], random: RunRandom) -> nn.Module:
    """One model that trains ``models`` (same architecture) in lockstep; built in place of models[0].

    Every parameter must sit in a Linear, Embedding or LayerNorm: anything else is refused.
    """
    fused = models[0]
    for name, module in list(fused.named_modules()):
        if type(module) in _FUSED:
            replacement = _FUSED[type(module)]([m.get_submodule(name) for m in models])
        elif isinstance(module, nn.Dropout):
            replacement = RunDropout(module.p, random)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(fused.get_submodule(parent), child, replacement)
    prefix = fused.base_model_prefix
    setattr(fused, prefix, SentenceOutputs(getattr(fused, prefix)))
    unfused = [n for n, p in fused.named_parameters() if p.dim() == 0 or p.size(0) != len(models)
               or not isinstance(fused.get_submodule(n.rpartition(".")[0]), tuple(_FUSED.values()))]
    if unfused:
        raise ValueError(f"lockstep cannot fuse these parameters (not in Linear, Embedding or LayerNorm): {unfused}")
    return fused


def run_state_dict(fused: nn.Module, run: int) -> dict[str, torch.Tensor]:
    """Run ``run``'s parameters, named as in its own model (``model.safetensors`` of a lockstep run)."""
    prefix = f"{fused.base_model_prefix}."
    state = {}
    for name, param in fused.named_parameters():
        owner, _, leaf = name.rpartition(".")
        tensor = param.detach()[run]
        if leaf in getattr(fused.get_submodule(owner), "transposed", ()):
            tensor = tensor.t().contiguous()
        if name.startswith(prefix + "base."):
            name = prefix + name.removeprefix(prefix + "base.")
        state[name] = tensor
    return state


def solo_ndim(param: nn.Parameter) -> int:
    """The number of dimensions the parameter has in one run's model (for weight-decay groups)."""
    return param.dim() - 1


@torch.no_grad()
def keep_runs(fused: nn.Module, keep: Sequence[int], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Drop every other run from ``fused`` (and from the optimizer's state), in place."""
    index = torch.tensor(list(keep), device=next(fused.parameters()).device)
    for param in fused.parameters():
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        for key, value in state.items():  # AdamW's moments have the parameter's shape; its step does not
            if torch.is_tensor(value) and value.shape == param.shape:
                state[key] = value.index_select(0, index)
        param.data = param.data.index_select(0, index)
        if param.grad is not None:
            param.grad = param.grad.index_select(0, index)
