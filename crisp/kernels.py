"""A fused top-k drop for GPU training steps, in Triton.

The portable sparsifier (``crisp.attention._drop_mask``) ranks keys with a stable sort, scatters the
ranks back and fills: six kernel launches per layer on top of eager attention, in a step that is
bound by launches. This kernel does the same in one launch for rows of up to :data:`MAX_KEYS` keys;
its backward is one ``masked_fill``. It computes the same mask: it sorts a copy of each row in
registers to find the k-th highest valid score, keeps every score above it and, of the scores
equal to it, the first ones by position (a stable descending sort's order) until k are kept.

Triton is optional: without it (CPU wheels of torch) or for longer rows, crisp uses the sort.
``CRISP_FUSED_TOPK=0`` switches the kernel off.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels come without Triton
    triton = None

# longest row the kernel sorts in registers; longer rows take the portable sort
MAX_KEYS = 1024


def available(scores: torch.Tensor) -> bool:
    """Whether the fused kernel can take these scores."""
    return (
        triton is not None
        and (scores.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
        and scores.size(-1) <= MAX_KEYS
        and scores.dim() == 4
        and scores.is_contiguous()
        and os.environ.get("CRISP_FUSED_TOPK", "1") != "0"
    )


if triton is not None:

    @triton.jit
    def _topk_drop_kernel(
        scores_ptr, valid_ptr, k_ptr, out_ptr, drop_ptr,
        R, H, Q, K, k_scalar,
        v_sb, v_sh, v_sq, v_sk,
        k_sb, k_sh, k_sq,
        HAS_VALID: tl.constexpr, K_IS_TENSOR: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    ):
        # ROWS query rows (of any head and sentence) per program, a row's keys along the block
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < R
        q = rows % Q
        h = (rows // Q) % H
        b = rows // (Q * H)
        in_row = row_ok[:, None] & (cols[None, :] < K)
        offsets = rows[:, None] * K + cols[None, :]
        x = tl.load(scores_ptr + offsets, mask=in_row, other=0.0).to(tl.float32)
        ok = in_row
        if HAS_VALID:
            where = (b * v_sb + h * v_sh + q * v_sq)[:, None] + cols[None, :] * v_sk
            ok = ok & (tl.load(valid_ptr + where, mask=in_row, other=0) != 0)
        if K_IS_TENSOR:  # noqa: SIM108  (a constexpr branch: Triton compiles one side)
            k = tl.load(k_ptr + b * k_sb + h * k_sh + q * k_sq, mask=row_ok, other=1).to(tl.int32)
        else:
            k = tl.zeros([ROWS], dtype=tl.int32) + k_scalar
        # the k-th highest valid score, from a sorted copy of the row
        ranked = tl.sort(tl.where(ok, x, float("-inf")), dim=1, descending=True)
        kth = tl.sum(tl.where(cols[None, :] == k[:, None] - 1, ranked, 0.0), axis=1)
        # keep every score above it, and of those equal to it the first (k - #above) by position
        above = ok & (x > kth[:, None])
        tied = ok & (x == kth[:, None])
        need = k - tl.sum(above.to(tl.int32), axis=1)
        tie_rank = tl.cumsum(tied.to(tl.int32), axis=1)
        keep = above | (tied & (tie_rank <= need[:, None]))
        drop = keep == 0
        tl.store(out_ptr + offsets, tl.where(drop, float("-inf"), x), mask=in_row)
        tl.store(drop_ptr + offsets, drop.to(tl.int8), mask=in_row)


def _launch(scores: torch.Tensor, valid: torch.Tensor | None, k: torch.Tensor | int):
    batch, heads, queries, keys = scores.shape
    out = torch.empty_like(scores)
    drop = torch.empty(scores.shape, dtype=torch.int8, device=scores.device)
    if valid is not None:
        valid = valid.expand(batch, heads, queries, keys)
        valid_u8 = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
        v_strides = valid.stride()
    else:
        valid_u8, v_strides = scores, (0, 0, 0, 0)
    k_is_tensor = isinstance(k, torch.Tensor)
    if k_is_tensor:
        k = k.expand(batch, heads, queries, 1)
        k_tensor, k_strides, k_scalar = k, k.stride()[:3], 0
    else:
        k_tensor, k_strides, k_scalar = scores, (0, 0, 0), int(k)
    block = max(16, triton.next_power_of_2(keys))
    rows_per_program = max(1, 2048 // block)
    num_rows = batch * heads * queries
    _topk_drop_kernel[(triton.cdiv(num_rows, rows_per_program),)](
        scores, valid_u8, k_tensor, out, drop,
        num_rows, heads, queries, keys, k_scalar,
        *v_strides, *k_strides,
        HAS_VALID=valid is not None, K_IS_TENSOR=k_is_tensor, BLOCK=block, ROWS=rows_per_program, num_warps=4,
    )
    return out, drop.view(torch.bool)


class _FusedTopKDrop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, valid, k):
        out, drop = _launch(scores, valid, k)
        ctx.save_for_backward(drop)
        ctx.mark_non_differentiable(drop)
        return out, drop

    @staticmethod
    def backward(ctx, grad_out, _grad_drop):
        (drop,) = ctx.saved_tensors
        return grad_out.masked_fill(drop, 0), None, None


def fused_topk_drop(scores: torch.Tensor, valid: torch.Tensor | None, k: torch.Tensor | int):
    """``(scores with every dropped or invalid key at -inf, the boolean drop mask)``.

    ``valid`` broadcasts to ``scores`` (True = key may be attended); ``k`` is an int or a tensor that
    broadcasts to ``scores.shape[:-1] + (1,)``. Gradients flow only through kept scores.
    """
    return _FusedTopKDrop.apply(scores.contiguous(), valid, k)
