"""One model that holds R runs of one architecture: leaf modules swapped for fused versions.

transformers' modeling code runs unchanged on a batch whose rows are R equal blocks, one per run
(the run dimension folded into the batch). Only the modules that hold parameters or randomness
are swapped:

- ``Linear`` -> :class:`FusedLinear`: R weight matrices, one batched matmul over ``[R, tokens, in]``
  (stored transposed, ``[R, in, out]``: the matmul's weight gradient then comes out in the
  parameter's own layout and is not copied again for every parameter on every step; under CUDA
  autocast the gradients of fp32 tensors come out in fp32, not cast up from bf16, an input that
  several linears share is cast once, and the weights' bf16 copies are rewritten once per optimizer
  step, not cast in every forward: :class:`WeightCopies`);
- sibling Linears that read one input (an attention's query, key and value: the family's
  ``projections``) -> :class:`FusedProjections` and :class:`ProjectionOf`: one matmul for all three
  and, in backward, one for their input's gradient, where three linears take three and two fp32 sums;
- ``Embedding`` -> :class:`FusedEmbedding`: R tables, one lookup in their concatenation; the word
  embeddings train only the rows that the training data uses (see the class);
- ``LayerNorm`` -> :class:`FusedLayerNorm`: normalisation, then each run's scale and shift (one
  Triton launch each way on a GPU, :mod:`crisp.lockstep.layer_norm`);
- ``Dropout`` -> :class:`RunDropout`: each run's mask from its own stream and with its own
  probability (:mod:`crisp.lockstep.dropout`).

Activations, reshapes and attention already work row by row; crisp's attention function gives each
run its own sparsity (``crisp_sparsity`` is then a tuple, see :class:`crisp.sparsity.attention.RunRows`).
A fused parameter's first dimension is the run: ``param[r]`` is run r's tensor, shaped as in its
own model, so AdamW (elementwise) updates every run exactly as it would alone; each fused module's
``solo(leaf, run)`` gives run r's tensor as its own model holds it (``solo_state`` for the siblings'
tensors that one :class:`FusedProjections` holds).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from torch.nn import functional as F

from crisp.lockstep import layer_norm
from crisp.lockstep.dropout import RunProbabilities, RunRandom
from crisp.lockstep.run_adamw import RunAdamW


def _stack(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]))


# bf16 matmuls that write fp32 (``torch.bmm(..., out_dtype=)``, CUDA only)
_FP32_OUT_BMM = hasattr(torch.ops.aten.bmm, "dtype")


class InputCasts:
    """The bf16 copy of the last input a model's FusedLinears cast, for the next that takes the same input.

    Linears that read one hidden state (an attention's query, key and value, where its family names no
    ``projections`` to fuse them into one :class:`FusedProjections`): autocast casts it for each, here
    once. Assumes one forward at a time per fused model (one cache per model, made by :func:`fuse`); a
    copy is reused only for the very tensor it was cast from, unmodified since (its version counter),
    and is dropped by the first backward, so that it does not outlive the step.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._source, self._version, self._copy = None, -1, None

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x
        if self._source is None or self._source() is not x or self._version != x._version or self._copy.dtype != dtype:
            self._source, self._version, self._copy = weakref.ref(x), x._version, x.to(dtype)
        return self._copy


class WeightCopies:
    """Low-precision copies of a fused model's matmul weights and biases: each made once, then all
    rewritten in place in one launch after every optimizer step (:meth:`follow`).

    Autocast casts every weight in every forward, two launches per linear inside the step's CUDA graph.
    Torch's fused AdamW does not bump a parameter's version counter, so a copy cannot see by itself that
    it is stale: copies are used only once :meth:`follow` has tied them to the optimizer that changes the
    weights. Until then, and for a parameter whose storage changed since (a run left the group), a
    forward casts as autocast does.
    """

    def __init__(self):
        self._copies: dict[int, tuple[weakref.ref, torch.Tensor, int]] = {}
        self.active = False

    def __call__(self, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self.active:
            return param.to(dtype)
        entry = self._copies.get(id(param))
        if entry is None or entry[1].dtype != dtype or self._owner(entry) is not param:
            if torch.cuda.is_current_stream_capturing():  # a copy made here would belong to the graph's pool
                return param.to(dtype)
            entry = self._copies[id(param)] = (weakref.ref(param), param.detach().to(dtype), param.data_ptr())
        return entry[1]

    @staticmethod
    def _owner(entry: tuple[weakref.ref, torch.Tensor, int]) -> torch.Tensor | None:
        """The parameter that ``entry``'s copy still stands for (alive, same storage and shape), else None."""
        ref, copy, ptr = entry
        param = ref()
        return param if param is not None and param.data_ptr() == ptr and copy.shape == param.shape else None

    @torch.no_grad()
    def refresh(self) -> None:
        live = [(param, entry[1]) for entry in self._copies.values() if (param := self._owner(entry)) is not None]
        if live:
            torch._foreach_copy_([copy for _, copy in live], [param for param, _ in live])

    def follow(self, optimizer: torch.optim.Optimizer) -> None:
        """From now on ``optimizer`` alone changes the weights: the copies follow each of its steps."""
        optimizer.register_step_post_hook(lambda *_: self.refresh())
        self.active = True


class _AutocastBatchedLinear(torch.autograd.Function):
    """What autocast computes for ``baddbmm(bias, x, weight)``, except that the gradients come out of
    the matmuls and the reduction in fp32 where the tensor is fp32 (autocast rounds them to bf16 and
    casts them up in more kernels: 6 more bytes of traffic per element), that an input shared by
    several linears is cast once (:class:`InputCasts`) and that the weights' copies are kept
    (:class:`WeightCopies`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, casts, copies):
        # x as the module got it: the very tensor that the sibling projections get too
        x16, w16 = casts(x, dtype).reshape(weight.size(0), -1, x.size(-1)), copies(weight, dtype)
        y = torch.bmm(x16, w16) if bias is None else torch.baddbmm(copies(bias, dtype).unsqueeze(1), x16, w16)
        ctx.save_for_backward(x16, w16)
        ctx.has_bias, ctx.x_dtype, ctx.x_shape, ctx.casts = bias is not None, x.dtype, x.shape, casts
        return y

    @staticmethod
    def backward(ctx, grad):
        ctx.casts.clear()
        x16, w16 = ctx.saved_tensors
        grad = grad.to(w16.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            fp32 = ctx.x_dtype == torch.float32
            grad_x = torch.bmm(grad, w16.transpose(1, 2), **({"out_dtype": torch.float32} if fp32 else {}))
            grad_x = grad_x.reshape(ctx.x_shape)
        grad_w = torch.bmm(x16.transpose(1, 2), grad, out_dtype=torch.float32)
        grad_b = grad.sum(1, dtype=torch.float32) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None


class FusedLinear(nn.Module):

    def __init__(self, linears: Sequence[nn.Linear], casts: InputCasts | None = None,
                 copies: WeightCopies | None = None):
        super().__init__()
        self.weight = _stack([m.weight.t() for m in linears])  # [R, in, out]
        self.bias = _stack([m.bias for m in linears]) if linears[0].bias is not None else None  # [R, out]
        self.casts = casts or InputCasts()
        self.copies = copies or WeightCopies()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs, shape = self.weight.size(0), x.shape
        if x.is_cuda and _FP32_OUT_BMM and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            with torch.autocast("cuda", enabled=False):
                y = _AutocastBatchedLinear.apply(x, self.weight, self.bias, dtype, self.casts, self.copies)
            return y.reshape(*shape[:-1], -1)
        x = x.reshape(runs, -1, shape[-1])
        y = torch.bmm(x, self.weight) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)
        return y.reshape(*shape[:-1], -1)

    def solo(self, leaf: str, run: int) -> torch.Tensor:
        tensor = getattr(self, leaf).detach()[run]
        return tensor.t().contiguous() if leaf == "weight" else tensor  # run r's nn.Linear weight is weight[r].T


class FusedProjections(FusedLinear):
    """Sibling linears that read the same input, as one: ``weight`` is ``[R, in, sum of outs]``.

    It stands in for the first sibling; :class:`ProjectionOf` stands in for each other one. Whichever is
    called first computes every sibling's output in one matmul and keeps the others' for that very input
    (the tensor, unmodified since: its version counter), each handed out once. Called with another
    input, a sibling computes them afresh, so the result is always that of its own linear. The outputs
    are ``split`` views of one tensor: in backward autograd concatenates their gradients into one.
    """

    def __init__(self, siblings: Sequence[Sequence[nn.Linear]], names: Sequence[str], casts: InputCasts | None = None,
                 copies: WeightCopies | None = None):
        nn.Module.__init__(self)
        self.names = list(names)  # the siblings' names in their parent module, in the weight's order
        runs = range(len(siblings[0]))
        self.widths = [group[0].out_features for group in siblings]
        self.weight = _stack([torch.cat([group[r].weight.t() for group in siblings], 1) for r in runs])
        has_bias = siblings[0][0].bias is not None
        self.bias = _stack([torch.cat([group[r].bias for group in siblings]) for r in runs]) if has_bias else None
        self.casts = casts or InputCasts()
        self.copies = copies or WeightCopies()
        self._kept: tuple = (None, -1, [])

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        source, version, outputs = self._kept
        if source is None or source() is not x or version != x._version or outputs[index] is None:
            outputs = list(super().forward(x).split(self.widths, dim=-1))
        out, outputs[index] = outputs[index], None
        self._kept = (weakref.ref(x), x._version, outputs) if any(o is not None for o in outputs) else (None, -1, [])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(x, 0)

    def solo_state(self, leaf: str, run: int) -> dict[str, torch.Tensor]:
        """Run ``run``'s ``leaf`` of each sibling, as ``"<sibling>.<leaf>"`` (names in the parent module)."""
        parts = getattr(self, leaf).detach()[run].split(self.widths, dim=-1)
        return {f"{name}.{leaf}": part.t().contiguous() if leaf == "weight" else part
                for name, part in zip(self.names, parts, strict=True)}


class ProjectionOf(nn.Module):
    """The ``index``-th sibling of a :class:`FusedProjections`: its parameters live there."""

    def __init__(self, owner: FusedProjections, index: int):
        super().__init__()
        self._owner = [owner]  # not a submodule: the parameters are the owner's, listed once
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._owner[0].output(x, self.index)


class FusedEmbedding(nn.Module):
    """R embedding tables, one lookup in their concatenation.

    With ``trained_rows`` (the token ids that the training data holds) only those rows are a
    parameter; the others can get no gradient in any step, so all AdamW ever does to them is weight
    decay: ``row *= 1 - lr * weight_decay`` per step. They are kept as a buffer with each run's factor
    accumulated in ``decay`` (:func:`follow_weight_decay`) and applied when they are read. Exact, and
    on SST-2 with a BERT vocabulary 62% of the word embeddings (a third of MiniLM's parameters)
    leave the optimizer's step. Every token of a training batch must be a trained row.
    """

    def __init__(self, embeddings: Sequence[nn.Embedding], trained_rows: torch.Tensor | None = None):
        super().__init__()
        weight = torch.stack([m.weight.detach() for m in embeddings])  # [R, vocab, dim]
        self.padding_idx = embeddings[0].padding_idx
        self.vocab = weight.size(1)
        self.register_buffer("frozen", None)
        if trained_rows is None:
            self.weight = nn.Parameter(weight)
            return
        trained = torch.zeros(self.vocab, dtype=torch.bool)
        trained[trained_rows] = True
        rows, rest = trained.nonzero().squeeze(1), (~trained).nonzero().squeeze(1)
        # a row's index among the trained (or the frozen) rows; out of range for the other kind
        slot = torch.full((self.vocab,), len(rows), dtype=torch.long)
        slot[rows] = torch.arange(len(rows))
        frozen_slot = torch.zeros(self.vocab, dtype=torch.long)
        frozen_slot[rest] = torch.arange(len(rest))
        self.weight = nn.Parameter(weight[:, rows].contiguous())  # [R, trained, dim]
        self.register_buffer("frozen", weight[:, rest].contiguous())  # [R, vocab - trained, dim]
        self.register_buffer("decay", torch.ones(len(embeddings), dtype=torch.float64))  # each run's, so far
        for name, value in (("rows", rows), ("rest", rest), ("trained", trained), ("slot", slot),
                            ("frozen_slot", frozen_slot)):
            self.register_buffer(name, value, persistent=False)

    def _lookup(self, table: torch.Tensor, per_run: torch.Tensor) -> torch.Tensor:
        runs, rows, dim = table.shape
        offsets = torch.arange(runs, device=per_run.device) * rows
        return F.embedding(per_run + offsets[:, None], table.view(runs * rows, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        runs, dim = self.weight.size(0), self.weight.size(-1)
        per_run = ids.view(runs, -1)
        if self.frozen is None:
            out = self._lookup(self.weight, per_run)
        elif self.training:  # only trained rows; any other id is out of range and fails loudly
            out = self._lookup(self.weight, self.slot[per_run])
        else:  # evaluation may meet tokens that training never saw
            trained = self.trained[per_run].unsqueeze(-1)
            out = torch.where(trained, self._lookup(self.weight, self.slot[per_run].clamp_max(self.weight.size(1) - 1)),
                              self._lookup(self.frozen, self.frozen_slot[per_run])
                              * self.decay.to(self.frozen.dtype)[:, None, None])
        if self.padding_idx is not None:
            # as nn.Embedding(padding_idx=...) does: the padding row gets no gradient from its tokens
            out = torch.where((per_run == self.padding_idx).unsqueeze(-1), out.detach(), out)
        return out.view(*ids.shape, dim)

    def solo(self, leaf: str, run: int) -> torch.Tensor:
        """Run ``run``'s whole table, as in its own model."""
        if self.frozen is None:
            return self.weight.detach()[run]
        table = self.weight.new_empty(self.vocab, self.weight.size(-1))
        table[self.rows] = self.weight.detach()[run]
        table[self.rest] = (self.frozen[run] * self.decay[run]).to(table.dtype)
        return table

    def keep_runs(self, index: torch.Tensor) -> None:
        if self.frozen is not None:
            self.frozen, self.decay = self.frozen.index_select(0, index), self.decay.index_select(0, index)


def follow_weight_decay(fused: nn.Module, optimizer: RunAdamW) -> None:
    """After every optimizer step, the factor by which each run's AdamW decayed its frozen embedding rows."""
    tables = [m for m in fused.modules() if isinstance(m, FusedEmbedding) and m.frozen is not None]
    if any(not any(p is m.weight for p in optimizer.param_groups[0]["params"]) for m in tables):
        raise ValueError("the word embeddings must be in the optimizer's decayed group")

    def decayed(optimizer, args, kwargs) -> None:
        for table in tables:
            for (start, stop), factor in optimizer.decay_factors():  # a scalar per slice: no copy to the device
                table.decay[start:stop].mul_(factor)

    if tables:
        optimizer.register_step_post_hook(decayed)


class FusedLayerNorm(nn.Module):
    def __init__(self, norms: Sequence[nn.LayerNorm]):
        super().__init__()
        self.normalized_shape, self.eps = tuple(norms[0].normalized_shape), norms[0].eps
        self.weight = _stack([m.weight for m in norms])  # [R, dim]
        self.bias = _stack([m.bias for m in norms])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) == 1 and layer_norm.available(x):  # one launch each way
            return layer_norm.run_layer_norm(x, self.weight, self.bias, self.eps)
        runs, shape = self.weight.size(0), x.shape
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps).view(runs, -1, shape[-1])
        return torch.addcmul(self.bias.unsqueeze(1), y, self.weight.unsqueeze(1)).view(shape)

    def solo(self, leaf: str, run: int) -> torch.Tensor:
        return getattr(self, leaf).detach()[run]


class RunDropout(nn.Module):
    """Dropout with each run's probability (its own model's at this site) and random stream.

    ``p`` is what transformers' attention modules read and hand to the attention function: a float
    that carries every run's probability (:class:`crisp.lockstep.dropout.RunProbabilities`).
    """

    def __init__(self, probs: Sequence[float], random: RunRandom):
        super().__init__()
        self.random = random
        self.register_buffer("probs", torch.tensor(probs, dtype=torch.float32), persistent=False)
        self.register_buffer("scales", torch.tensor([1.0 / (1.0 - p) for p in probs], dtype=torch.float32),
                             persistent=False)
        self._largest = max(probs)

    @property
    def p(self) -> RunProbabilities:
        return RunProbabilities(self._largest, self.probs, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.random.dropout(x, self.p) if self.training and self._largest > 0 else x

    def keep_runs(self, index: torch.Tensor) -> None:
        self.probs, self.scales = self.probs.index_select(0, index), self.scales.index_select(0, index)
        self._largest = float(self.probs.max())


# where each packed sentence starts, for the heads; by context, like the runs (crisp.sparsity.attention):
# not every model's forward passes its keywords down to its base model (MPNet's does not)
_FIRST: ContextVar[torch.Tensor | None] = ContextVar("crisp_first", default=None)


@contextmanager
def sentences_start_at(first: torch.Tensor) -> Iterator[None]:
    """Inside, a fused model's head reads one state per sentence: at these flat token positions."""
    token = _FIRST.set(first)
    try:
        yield
    finally:
        _FIRST.reset(token)


class SentenceOutputs(nn.Module):
    """Wraps the base encoder for packed rows: the head gets each sentence's first token.

    Several sentences share a packed row, so ``hidden[:, 0]`` (what the classification heads take)
    would be one per row. Inside :func:`sentences_start_at` this hands the head one ``[sentences, 1,
    dim]`` state per sentence; a pooler (BERT's) runs on those instead.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.pooler = getattr(base, "pooler", None)
        if self.pooler is not None:
            base.pooler = None

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        first = _FIRST.get()
        if first is not None:
            first = out.last_hidden_state.flatten(0, 1)[first].unsqueeze(1)
            out["last_hidden_state"] = first
            if self.pooler is not None:
                out["pooler_output"] = self.pooler(first)
        return out


_FUSED = {nn.Linear: FusedLinear, nn.Embedding: FusedEmbedding, nn.LayerNorm: FusedLayerNorm}
_HOLDERS = (*_FUSED.values(), FusedProjections)


def _sibling_projections(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """For each module holding Linears under every one of ``names`` (same input width), their full names."""
    found = {}
    for owner, module in model.named_modules():
        children = [getattr(module, n, None) for n in names]
        if names and all(type(c) is nn.Linear for c in children) and len({c.in_features for c in children}) == 1 \
                and len({c.bias is None for c in children}) == 1:
            found[owner] = [f"{owner}.{n}" if owner else n for n in names]
    return found


def fuse(models: Sequence[nn.Module], random: RunRandom, trained_tokens: torch.Tensor | None = None,
         projections: Sequence[str] = ()) -> nn.Module:
    """One model that trains ``models`` (same architecture) in lockstep; built in place of models[0].

    Runs that start from the same weights may pass one model object more than once: each gets a copy.
    Every parameter must sit in a Linear, Embedding or LayerNorm: anything else is refused. With
    ``trained_tokens`` (every token id of the training data) the word embeddings train those rows only.
    ``projections`` names sibling Linears that read one input (the family's query, key and value):
    wherever a module holds all of them, they become one :class:`FusedProjections`.
    """
    fused = models[0]
    words = fused.get_input_embeddings()
    replacements, casts, copies = {}, InputCasts(), WeightCopies()
    groups = list(_sibling_projections(fused, projections).values())
    siblings = {name for group in groups for name in group}
    for group in groups:
        owner = FusedProjections([[m.get_submodule(name) for m in models] for name in group],
                                 [name.rpartition(".")[2] for name in group], casts, copies)
        replacements[group[0]] = owner
        replacements.update({name: ProjectionOf(owner, k) for k, name in enumerate(group) if k})
    for name, module in fused.named_modules():
        if name in siblings:
            continue
        if module is words and trained_tokens is not None:
            replacements[name] = FusedEmbedding([m.get_submodule(name) for m in models], trained_tokens)
        elif type(module) is nn.Linear:
            replacements[name] = FusedLinear([m.get_submodule(name) for m in models], casts, copies)
        elif type(module) in _FUSED:
            replacements[name] = _FUSED[type(module)]([m.get_submodule(name) for m in models])
        elif isinstance(module, nn.Dropout):
            replacements[name] = RunDropout([m.get_submodule(name).p for m in models], random)
    # swapped only once all are built: models[0] may be another run's model too
    for name, replacement in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(fused.get_submodule(parent), child, replacement)
    prefix = fused.base_model_prefix
    setattr(fused, prefix, SentenceOutputs(getattr(fused, prefix)))
    fused.crisp_weight_copies = copies  # for the optimizer to keep up to date (WeightCopies.follow)
    unfused = [n for n, p in fused.named_parameters() if p.dim() == 0 or p.size(0) != len(models)
               or not isinstance(fused.get_submodule(n.rpartition(".")[0]), _HOLDERS)]
    if unfused:
        raise ValueError(f"lockstep cannot fuse these parameters (not in Linear, Embedding or LayerNorm): {unfused}")
    return fused


def run_state_dict(fused: nn.Module, run: int) -> dict[str, torch.Tensor]:
    """Run ``run``'s parameters, named as in its own model (``model.safetensors`` of a lockstep run)."""
    prefix = f"{fused.base_model_prefix}."
    state = {}
    for name, _ in fused.named_parameters():
        owner, _, leaf = name.rpartition(".")
        module = fused.get_submodule(owner)
        if isinstance(module, FusedProjections):  # one parameter for several siblings' tensors
            parent = owner.rpartition(".")[0]
            tensors = {f"{parent}.{key}" if parent else key: t for key, t in module.solo_state(leaf, run).items()}
        else:
            tensors = {name: module.solo(leaf, run)}
        for full, tensor in tensors.items():
            if full.startswith(prefix + "base."):
                full = prefix + full.removeprefix(prefix + "base.")
            state[full] = tensor
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
    for module in fused.modules():
        if isinstance(module, (FusedEmbedding, RunDropout)):
            module.keep_runs(index)
