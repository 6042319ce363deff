"""Each lockstep run's own dropout stream.

In a fused step one dropout call covers every run's rows. With one generator for all of them, a
run's masks would depend on which other runs share its group; here run r's masks are a function of
its seed, the training step and the call site alone: ``key = mix(seed_r, step, site)``, then a
counter-based generator indexed by the element's position in the run's block. On a GPU that is one
Triton launch per dropout call (Philox, ``tl.rand``) that draws the mask and applies it, reading the
step from the device, so it can be replayed from a CUDA graph; the backward pass draws the same mask
again instead of keeping it (one read and one write per element each way, where a stored mask and
separate multiplies took five passes). On a CPU each run's block is drawn from a ``torch.Generator``
seeded with the key. The two give different (equally random) masks.

Each run has its own probability at each site (:class:`RunProbabilities`): runs whose dropout
differs train in one group. The same object is the runs' stream for a sparsifier that draws keys
(``random``): a :class:`crisp.sparsity.streams.RunStreams` with the same seeds and step, whose draws are
keyed by their own call sites (layer by layer), so a run draws the same keys in a group as alone.
"""

from __future__ import annotations

import hashlib
import os

import torch

from crisp.sparsity.streams import RunStreams

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
    def _apply_mask(x_ptr, out_ptr, run_start, offsets, per_run, uniform, p, scale):
        inside = offsets < per_run
        x = tl.load(x_ptr + run_start + offsets, mask=inside, other=0.0).to(tl.float32)
        kept = tl.where(uniform >= p, x * scale, 0.0)
        tl.store(out_ptr + run_start + offsets, kept.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _dropout_kernel(x_ptr, out_ptr, seeds_ptr, step_ptr, p_ptr, scale_ptr, per_run, site_key,
                        BLOCK: tl.constexpr):
        """out = x * keep * scale over each run's block; keep = the run's Philox draw >= the run's p. One
        Philox evaluation gives four numbers: each program's block is four quarters, one number each."""
        run = tl.program_id(0)
        p, scale = tl.load(p_ptr + run), tl.load(scale_ptr + run)
        quarter: tl.constexpr = BLOCK // 4
        counters = tl.program_id(1) * quarter + tl.arange(0, quarter)
        seed = tl.load(seeds_ptr + run).to(tl.uint64)
        step = tl.load(step_ptr).to(tl.uint64)
        key = seed * 0x9E3779B97F4A7C1 + step * 0xBF58476D1CE4E5B + site_key
        u0, u1, u2, u3 = tl.rand4x(key, counters)
        run_start = run.to(tl.int64) * per_run
        first = tl.program_id(1) * BLOCK + tl.arange(0, quarter)
        _apply_mask(x_ptr, out_ptr, run_start, first, per_run, u0, p, scale)
        _apply_mask(x_ptr, out_ptr, run_start, first + quarter, per_run, u1, p, scale)
        _apply_mask(x_ptr, out_ptr, run_start, first + 2 * quarter, per_run, u2, p, scale)
        _apply_mask(x_ptr, out_ptr, run_start, first + 3 * quarter, per_run, u3, p, scale)


class RunProbabilities(float):
    """A dropout site's probability for each run. transformers' attention code reads ``dropout.p`` and
    passes it on as a float: it sees the largest (so that its ``p > 0`` holds when any run drops);
    crisp's dropout reads each run's own from ``probs`` (and ``scales``: 1 / (1 - p)), on the device."""

    probs: torch.Tensor
    scales: torch.Tensor

    def __new__(cls, largest: float, probs: torch.Tensor, scales: torch.Tensor):
        value = super().__new__(cls, largest)
        value.probs, value.scales = probs, scales
        return value


def run_probabilities(p: float | RunProbabilities, runs: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each run's probability and scale, ``[runs]`` float32 tensors on ``device``."""
    if isinstance(p, RunProbabilities):
        return p.probs, p.scales
    return (torch.full((runs,), p, dtype=torch.float32, device=device),
            torch.full((runs,), 1.0 / (1.0 - p), dtype=torch.float32, device=device))


class RunRandom(RunStreams):
    """The random streams of a group's runs: dropout's (here) and the sparsifier's draws (:class:`RunStreams`:
    its seeds, its step on the device, ``keep_runs``). ``next_step()`` starts a training step's forward."""

    def __init__(self, seeds: list[int], device: torch.device | str):
        super().__init__(seeds, device)
        self.site = 0  # dropout's call sites; the sparsifier's draws count theirs per layer

    def next_step(self) -> None:
        super().next_step()
        self.site = 0

    def _site_key(self) -> int:
        site, self.site = self.site, self.site + 1
        return (site * _SITE) % 2**63

    def _apply_kernel(self, x: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor, site_key: int,
                      seeds: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        runs, block = len(seeds), 1024
        per_run = x.numel() // runs
        _dropout_kernel[(runs, triton.cdiv(per_run, block))](x, out, seeds, self.step, probs, scales, per_run,
                                                             site_key, BLOCK=block)
        return out

    def keep_mask(self, shape: torch.Size, p: float | RunProbabilities, device: torch.device) -> torch.Tensor:
        """The next call site's mask (True = kept), ``[runs * ..., ...]`` with one equal block per run."""
        runs = len(self.seeds)
        probs, _ = run_probabilities(p, runs, device)
        if _use_kernel(self.seeds):
            ones = torch.ones(shape, device=device)
            return self._apply_kernel(ones, probs, torch.ones_like(probs), self._site_key(), self.seeds) != 0
        per_run = shape.numel() // runs
        site = self.site
        self._site_key()
        step = int(self.step)
        blocks = []
        for seed, run_p in zip(self.seeds.tolist(), probs.tolist(), strict=True):
            digest = hashlib.blake2b(f"{seed}:{step}:{site}".encode(), digest_size=8).digest()
            generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)
            blocks.append(torch.rand(per_run, generator=generator, device=device) >= run_p)
        return torch.cat(blocks).view(shape)

    def dropout(self, x: torch.Tensor, p: float | RunProbabilities) -> torch.Tensor:
        if _use_kernel(x):
            return _KernelDropout.apply(x, p, self)
        return _MaskDropout.apply(x, p, self)


class _KernelDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, random):
        ctx.random, ctx.seeds = random, random.seeds
        ctx.probs, ctx.scales = run_probabilities(p, len(random.seeds), x.device)
        ctx.site_key = random._site_key()
        return random._apply_kernel(x, ctx.probs, ctx.scales, ctx.site_key, ctx.seeds)

    @staticmethod
    def backward(ctx, grad):
        # the same step (advanced only by the next forward), seeds, probabilities and site: the same mask
        return ctx.random._apply_kernel(grad, ctx.probs, ctx.scales, ctx.site_key, ctx.seeds), None, None


class _MaskDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, random):
        keep = random.keep_mask(x.shape, p, x.device)
        _, ctx.scales = run_probabilities(p, len(random.seeds), x.device)
        ctx.save_for_backward(keep)
        return _scaled(x * keep, ctx.scales)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _scaled(grad * keep, ctx.scales), None, None


def _scaled(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each run's block of ``x`` (equal blocks of its elements, in run order) times that run's scale."""
    return (x.reshape(len(scales), -1) * scales.to(x.dtype)[:, None]).view(x.shape)
