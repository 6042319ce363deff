"""Training steps replayed from CUDA graphs.

A MiniLM- or DistilBERT-sized step at batch 32 is some five hundred small kernels: launched one by
one from Python, the step's time is mostly launch overhead; replayed from a CUDA graph the same kernels
run back to back (docs/performance.md has the numbers). One graph is captured per batch shape (batches are padded to a
multiple of ``data.pad_to_multiple_of`` tokens, so a run sees a handful) and per ``extra`` key
(crisp uses it for "statistics on or off" and the layers' sparsities, which the graph bakes in).

Each graph runs forward, loss and backward; the optimizer step stays outside, so the learning-rate
schedule and Lightning's bookkeeping work unchanged. The first ``warmup`` steps of every shape run
eagerly on a side stream (lazy initialisation must not happen during capture) and are real
training steps: no batch is skipped or repeated. Each graph keeps a set of gradient buffers of its
own, so the graphs' gradients may take at most ``GRADS_SHARE`` of the device's memory (one graph
always): a large lockstep group's gradients are gigabytes per graph, and graphs captured for every
row count it meets would leave no room for validation. Shapes met after that run eagerly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

GRADS_SHARE = 0.2


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: tuple[torch.Tensor, ...]
    grads: list[torch.Tensor | None]


class GraphedTrainStep:
    """``step(batch, extra)`` runs ``loss, *rest = fn(batch)`` and ``loss.backward()``; returns
    ``(loss, *rest)`` detached. Gradients are left in ``param.grad`` for the optimizer."""

    def __init__(self, fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
                 params: list[torch.nn.Parameter], warmup: int = 1):
        self.fn = fn
        self.params = [p for p in params if p.requires_grad]
        self.warmup = warmup
        self.graphs: dict[Hashable, _Graph] = {}
        self.eager_steps: Counter = Counter()
        self.pool = torch.cuda.graph_pool_handle()  # graphs run one at a time: they share memory
        self._side = torch.cuda.Stream()
        self._grads_of: _Graph | None = None
        self._sum: list[torch.Tensor] | None = None  # gradients accumulated over steps (optimizer_step)

    def __call__(self, batch: dict[str, torch.Tensor], extra: Hashable = None) -> tuple[torch.Tensor, ...]:
        key = (tuple((name, tuple(t.shape), t.dtype) for name, t in batch.items()), extra)
        graph = self.graphs.get(key)
        if graph is None:
            if self.eager_steps[key] < self.warmup or not self._room_for_graph():
                self.eager_steps[key] += 1
                return self._eager(batch)
            graph = self.graphs[key] = self._capture(batch)
        for name, tensor in batch.items():
            graph.inputs[name].copy_(tensor, non_blocking=True)
        graph.graph.replay()
        if self._grads_of is not graph:
            # each graph writes its own gradient buffers: point the parameters at this one's
            for param, grad in zip(self.params, graph.grads, strict=True):
                param.grad = grad
            self._grads_of = graph
        return graph.outputs

    def optimizer_step(self, module, batch: dict[str, torch.Tensor], extra: Hashable = None, *,
                       accumulate: int = 1, step_now: bool = True,
                       clip: Callable[[], None] | None = None) -> tuple[list[torch.Tensor], bool]:
        """A training step of a LightningModule in manual optimisation: this step (forward and backward)
        and, when ``step_now``, the optimizer with this step as its closure, then the learning-rate schedule.

        Lightning applies accumulation and clipping only in automatic optimisation; here they are applied as
        it applies them there: with ``accumulate`` > 1 the gradients of the steps up to ``step_now`` are summed,
        each scaled by 1/accumulate (a graph overwrites its gradient buffers at every replay, so they are summed
        in buffers of their own), and ``clip`` runs on the whole gradient before the optimizer steps.
        Returns the outputs and whether the optimizer stepped."""
        if accumulate > 1 and not step_now:
            outputs = self(batch, extra)
            self._accumulate(1.0 / accumulate)
            return list(outputs), False
        outputs = []

        def forward_backward():
            outputs[:] = self(batch, extra)
            if accumulate > 1:
                self._accumulate(1.0 / accumulate, into_grads=True)
            if clip is not None:
                clip()
            return outputs[0]

        module.optimizers().step(closure=forward_backward)
        scheduler = module.lr_schedulers()
        if scheduler is not None:  # a lockstep group's optimizer follows its runs' schedules itself
            scheduler.step()
        return outputs, True

    @torch.no_grad()
    def _accumulate(self, scale: float, into_grads: bool = False) -> None:
        """Add this step's gradients, times ``scale``, to the sum so far; ``into_grads``: the last step of the
        sum, whose gradients become the whole sum (and the sum starts again)."""
        grads = [p.grad for p in self.params]
        if self._sum is None:
            self._sum = [torch.zeros_like(g) for g in grads]
        if into_grads:
            torch._foreach_mul_(grads, scale)
            torch._foreach_add_(grads, self._sum)
            torch._foreach_zero_(self._sum)
        else:
            torch._foreach_add_(self._sum, grads, alpha=scale)

    def _room_for_graph(self) -> bool:
        grads = sum(p.numel() * p.element_size() for p in self.params)
        total = torch.cuda.get_device_properties(self.params[0].device).total_memory
        return not self.graphs or (len(self.graphs) + 1) * grads <= GRADS_SHARE * total

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        loss, *rest = self.fn(batch)
        loss.backward()
        return (loss.detach(), *(t.detach() for t in rest))

    def _eager(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for param in self.params:
            param.grad = None
        self._grads_of = None
        current = torch.cuda.current_stream()
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            outputs = self._forward_backward(batch)
        current.wait_stream(self._side)
        return outputs

    def _capture(self, batch: dict[str, torch.Tensor]) -> _Graph:
        inputs = {name: tensor.clone() for name, tensor in batch.items()}
        for param in self.params:
            param.grad = None  # so that backward allocates (and on replay overwrites) the graph's own
        graph = torch.cuda.CUDAGraph()
        # autocast's weight cache must not outlive the capture; thread_local: the data loader's
        # pin-memory thread may touch CUDA while this thread captures
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        with autocast, torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = self._forward_backward(inputs)
        captured = _Graph(graph, inputs, outputs, [p.grad for p in self.params])
        self._grads_of = None
        return captured

    @property
    def stats(self) -> dict[str, int]:
        return {"graphs": len(self.graphs), "eager_steps": sum(self.eager_steps.values())}
