"""AdamW over fused parameters whose runs have learning rates, weight decays and warm-ups of their own.

A fused parameter's first dimension is the run. The group orders its runs so that runs with equal
hyperparameters sit side by side: each set of them is then one contiguous slice ``p[a:b]`` of every
parameter, and torch's own AdamW (its fused CUDA kernel, or the implementation it picks by default,
as for a run alone) steps each slice with that slice's learning rate and weight decay, on views of the
parameters, gradients and moments. The moments keep the parameter's full shape, so that
:func:`crisp.lockstep.fused.keep_runs` slices them as it slices the parameters when a run leaves.
Each slice's learning rate follows transformers' linear warm-up and decay schedule with its own
warm-up; with one slice this is ``torch.optim.AdamW`` with ``get_linear_schedule_with_warmup``, step for step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch.optim.adamw import adamw
from torch.optim.optimizer import _get_scalar_dtype


class RunOptim(NamedTuple):
    """What of the optimizer a run of a group may have of its own (a value: runs with equal ones step together)."""

    lr: float
    weight_decay: float
    warmup_ratio: float


@dataclass(frozen=True)
class Slice:
    start: int
    stop: int
    optim: RunOptim


def slices_of(runs: Sequence[RunOptim]) -> list[Slice]:
    """The runs cut into stretches of equal hyperparameters, in order."""
    cuts: list[Slice] = []
    for position, optim in enumerate(runs):
        if cuts and cuts[-1].optim == optim:
            cuts[-1] = Slice(cuts[-1].start, position + 1, optim)
        else:
            cuts.append(Slice(position, position + 1, optim))
    return cuts


def _runs_of(s: Slice, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's runs of ``s`` (with one slice, the tensors themselves: hundreds of views cost the host
    a millisecond a step)."""
    return [t[s.start : s.stop] for t in tensors]


def linear_warmup(step: int, warmup: int, total: int) -> float:
    """transformers' get_linear_schedule_with_warmup factor at ``step`` (the same float arithmetic)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


class RunAdamW(torch.optim.Optimizer):
    """AdamW (no decay for ``not_decayed``) with run r's hyperparameters ``runs[r]`` and its linear schedule
    over ``total_steps``; ``fused``: torch's fused kernel, else the implementation torch picks by default."""

    def __init__(self, decayed: list[torch.Tensor], not_decayed: list[torch.Tensor], runs: Sequence[RunOptim],
                 total_steps: int, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, fused: bool = False):
        super().__init__([{"params": decayed, "decay": True}, {"params": not_decayed, "decay": False}],
                         {"betas": tuple(betas), "eps": eps, "lr": 0.0})
        self.runs, self.slices = list(runs), slices_of(runs)
        self.total_steps, self.fused, self.done = total_steps, fused, 0
        self.last_lrs: list[float] = []

    def lrs(self) -> list[float]:
        """Each slice's learning rate for the next step."""
        return [s.optim.lr * linear_warmup(self.done, round(s.optim.warmup_ratio * self.total_steps), self.total_steps)
                for s in self.slices]

    def decay_factors(self) -> list[tuple[tuple[int, int], float]]:
        """Per slice (its runs), the factor by which the last step's weight decay scaled a decayed parameter."""
        return [((s.start, s.stop), 1 - lr * s.optim.weight_decay) for s, lr in zip(self.slices, self.last_lrs,
                                                                                    strict=True)]

    def keep_runs(self, keep: Sequence[int]) -> None:
        """Only these runs go on (their moments are sliced with the parameters: crisp.lockstep.fused.keep_runs)."""
        self.runs = [self.runs[i] for i in keep]
        self.slices = slices_of(self.runs)
        for state in self.state.values():
            if "steps" in state:  # every slice has taken every step
                state["steps"] = [state["steps"][0].clone() for _ in self.slices]

    def state_dict(self) -> dict:
        """torch's, with the steps taken (a resumed group's schedule goes on from there)."""
        return {**super().state_dict(), "done": self.done}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then each slice's step count: every slice of a group has taken every step (the group
        resumed may have other slices than the one saved)."""
        done = int(state_dict.get("done", 0))
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "done"})
        self.done = done
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    device = p.device if self.fused else "cpu"
                    state["steps"] = [torch.tensor(float(done), dtype=_get_scalar_dtype(is_fused=self.fused),
                                                   device=device) for _ in self.slices]

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            # as torch's AdamW keeps the count: on the device for the fused kernel, on the host for foreach
            device = p.device if self.fused else "cpu"
            state["steps"] = [torch.zeros((), dtype=_get_scalar_dtype(is_fused=self.fused), device=device)
                              for _ in self.slices]
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_lrs = self.lrs()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            beta1, beta2 = group["betas"]
            grads, exp_avgs, exp_avg_sqs = ([p.grad for p in params], [st["exp_avg"] for st in states],
                                            [st["exp_avg_sq"] for st in states])
            for k, (s, lr) in enumerate(zip(self.slices, self.last_lrs, strict=True)):
                part = (lambda tensors: tensors) if len(self.slices) == 1 else partial(_runs_of, s)
                adamw(part(params), part(grads), part(exp_avgs), part(exp_avg_sqs), [],
                      [st["steps"][k] for st in states], fused=self.fused or None,  # else torch's default, as alone
                      amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                      weight_decay=s.optim.weight_decay if group["decay"] else 0.0, eps=group["eps"], maximize=False)
        self.done += 1
        return loss
