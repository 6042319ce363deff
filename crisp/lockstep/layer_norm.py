"""LayerNorm with each run's own scale and shift, in one Triton launch each way.

A lockstep group's LayerNorm is ``F.layer_norm`` without an affine, then ``addcmul`` with the runs'
weights broadcast over their blocks of rows; backward, PyTorch adds a multiply for each factor, two
reductions for the weight and bias gradients and the normalisation's own backward: seven kernels
and some sixty bytes of traffic per element, on thirteen LayerNorms of a BERT-sized step. Here the
forward is one kernel (normalise, scale, shift; it keeps each row's mean and 1/std), and the
backward is one kernel that writes the input's gradient and each program's partial sums for the
weight and bias, then one sum over those partials.

Rows are one equal block per run (the run dimension folded into the batch), as everywhere in
:mod:`crisp.lockstep`. Computed in fp32 (autocast's LayerNorm runs in fp32 too); the output is
fp32 like autocast's. Where Triton cannot run (CPU wheels) the group keeps the PyTorch ops.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels come without Triton
    triton = None

ROWS_PER_PROGRAM = 16  # backward: rows whose weight and bias gradients one program sums


def available(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and x.size(-1) <= 8192


if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, rows_per_run, D, eps,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        run = row // rows_per_run
        cols = tl.arange(0, BLOCK)
        inside = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        centred = tl.where(inside, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
        w = tl.load(w_ptr + run * D + cols, mask=inside, other=0.0)
        b = tl.load(b_ptr + run * D + cols, mask=inside, other=0.0)
        tl.store(y_ptr + row * D + cols, centred * rstd * w + b, mask=inside)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _backward_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, partial_ptr, rows_per_run, D,
                         chunks, runs, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        run = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        inside = cols < D
        w = tl.load(w_ptr + run * D + cols, mask=inside, other=0.0)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ROWS):
            in_run = chunk * ROWS + i
            if in_run < rows_per_run:
                row = run * rows_per_run + in_run
                x = tl.load(x_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
                xhat = tl.where(inside, (x - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row), 0.0)
                wdy = w * dy
                c1 = tl.sum(xhat * wdy, axis=0) / D
                c2 = tl.sum(wdy, axis=0) / D
                dx = (wdy - (xhat * c1 + c2)) * tl.load(rstd_ptr + row)
                tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)
                dw += dy * xhat
                db += dy
        # partials laid out [2, runs, chunks, D]: weight's first, then bias's
        at = (run * chunks + chunk) * D + cols
        tl.store(partial_ptr + at, dw, mask=inside)
        tl.store(partial_ptr + runs * chunks * D + at, db, mask=inside)


class _RunLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        runs, dim = weight.shape
        x = x.contiguous()
        rows = x.numel() // dim
        y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block = triton.next_power_of_2(dim)
        _forward_kernel[(rows,)](x, weight, bias, y, mean, rstd, rows // runs, dim, eps, BLOCK=block,
                                 num_warps=4 if block >= 1024 else 2)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        runs, dim = weight.shape
        rows_per_run = x.numel() // dim // runs
        chunks = triton.cdiv(rows_per_run, ROWS_PER_PROGRAM)
        dx = torch.empty_like(x)
        partial = torch.empty(2, runs, chunks, dim, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(dim)
        _backward_kernel[(runs, chunks)](dy.contiguous(), x, weight, mean, rstd, dx, partial, rows_per_run, dim,
                                         chunks, runs, ROWS=ROWS_PER_PROGRAM, BLOCK=block,
                                         num_warps=4 if block >= 1024 else 2)
        dw, db = partial.sum(2)
        return dx, dw.to(weight.dtype), db.to(weight.dtype), None


def run_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` (rows: one equal block per run), then run r's
    ``weight[r]`` and ``bias[r]`` (``[runs, dim]``) on its block. Returns fp32."""
    with torch.autocast(x.device.type, enabled=False):
        return _RunLayerNorm.apply(x, weight, bias, eps)
