"""Each lockstep run's own dropout stream.

In a fused step one dropout call covers every run's rows. With one generator for all of them, a
run's masks would depend on which other runs share its group; here run r's masks are a function of
its seed, the training step and the call site alone: ``key = mix(seed_r, step, site)``, then a
counter-based generator indexed by the element's position in the run's block. On a GPU that is one
Triton launch per dropout call (Philox, ``tl.rand``), reading the step from the device, so it can
be replayed from a CUDA graph; on a CPU each run's block is drawn from a ``torch.Generator`` seeded
with the key. The two give different (equally random) masks.
"""

from __future__ import annotations

import hashlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels come without Triton
    triton = None

_SITE = 0x94D049BB133111E  # odd, < 2**63: spreads call sites over the key space


def _use_kernel(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _keep_mask_kernel(seeds_ptr, step_ptr, keep_ptr, per_run, site_key, p, BLOCK: tl.constexpr):
        run = tl.program_id(0)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seeds_ptr + run).to(tl.uint64)
        step = tl.load(step_ptr).to(tl.uint64)
        key = seed * 0x9E3779B97F4A7C1 + step * 0xBF58476D1CE4E5B + site_key
        keep = tl.rand(key, offsets) >= p
        tl.store(keep_ptr + run.to(tl.int64) * per_run + offsets, keep, mask=offsets < per_run)


class RunRandom:
    """The dropout streams of a group's runs. ``next_step()`` starts a training step's forward."""

    def __init__(self, seeds: list[int], device: torch.device | str):
        self.seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.site = 0

    def next_step(self) -> None:
        self.step.add_(1)  # on the device: a CUDA graph's replay advances it too
        self.site = 0

    def keep_runs(self, keep: list[int]) -> None:
        self.seeds = self.seeds[torch.tensor(keep, device=self.seeds.device)]

    def keep_mask(self, shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
        runs = len(self.seeds)
        per_run = shape.numel() // runs
        site, self.site = self.site, self.site + 1
        if _use_kernel(self.seeds):
            keep = torch.empty(shape, dtype=torch.bool, device=device)
            block = 1024
            _keep_mask_kernel[(runs, triton.cdiv(per_run, block))](
                self.seeds, self.step, keep, per_run, (site * _SITE) % 2**63, p, BLOCK=block)
            return keep
        step = int(self.step)
        blocks = []
        for seed in self.seeds.tolist():
            digest = hashlib.blake2b(f"{seed}:{step}:{site}".encode(), digest_size=8).digest()
            generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)
            blocks.append(torch.rand(per_run, generator=generator, device=device) >= p)
        return torch.cat(blocks).view(shape)

    def dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return _RunDropout.apply(x, p, self)


class _RunDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, random):
        keep = random.keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None
