"""Attention computed outside crisp's function, caught in the act: the second half of crisp's reach check.

Counting which attention modules ran crisp's function (:func:`crisp.sparsity.attention.probe_reached`) cannot
see an attention crisp never found: a module whose class name does not end in "Attention", or an encoder
that computes its attention inline next to a decoder that dispatches through the registry (BigBird-Pegasus).
Every attention ends in a softmax over its keys (or in ``scaled_dot_product_attention``), so during crisp's dry
forward this mode counts the softmaxes over a sentence's keys (the last two dimensions as long as the sentence)
that run outside crisp's function: each is an attention that would stay dense.
"""

from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode

_SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, torch.special.softmax,
            torch.nn.functional.scaled_dot_product_attention}


def _inside(code) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


class InlineAttention(TorchFunctionMode):
    """Counts (in ``found``) attention softmaxes over ``length`` keys that run outside ``crisp_code``."""

    def __init__(self, length: int, crisp_code):
        super().__init__()
        self.length, self.crisp_code, self.found = length, crisp_code, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SOFTMAX and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            over_keys = x.dim() >= 3 and x.size(-1) == self.length and x.size(-2) == self.length
            if (over_keys or func is torch.nn.functional.scaled_dot_product_attention) and \
                    not _inside(self.crisp_code):
                self.found += 1
        return func(*args, **kwargs)
