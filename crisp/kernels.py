"""A fused top-k drop for GPU training steps, in Triton.

The portable sparsifier (``crisp.attention._drop_mask``) ranks keys with a stable sort, scatters the
ranks back and fills: six kernel launches per layer on top of eager attention, in a step that is
bound by launches. This kernel does rank, compare and fill in one launch for rows of up to
:data:`MAX_KEYS` keys (every SST-2 shape); its backward is one ``masked_fill``. It computes the
same mask: the rank of key i is the number of valid keys with a higher score, plus those with an
equal score at a lower position (a stable descending sort's order).

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

# keys per row the pairwise rank handles in registers (BLOCK x BLOCK comparisons per row)
MAX_KEYS = 128


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
        H, Q, K, k_scalar,
        v_sb, v_sh, v_sq, v_sk,
        k_sb, k_sh, k_sq,
        HAS_VALID: tl.constexpr, K_IS_TENSOR: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)  # one query row of one head of one sentence
        q = row % Q
        h = (row // Q) % H
        b = row // (Q * H)
        cols = tl.arange(0, BLOCK)
        in_row = cols < K
        raw = tl.load(scores_ptr + row * K + cols, mask=in_row, other=0.0)
        x = raw.to(tl.float32)
        ok = in_row
        if HAS_VALID:
            allowed = tl.load(valid_ptr + b * v_sb + h * v_sh + q * v_sq + cols * v_sk, mask=in_row, other=0)
            ok = ok & (allowed != 0)
        if K_IS_TENSOR:  # noqa: SIM108  (a constexpr branch: Triton compiles one side)
            k = tl.load(k_ptr + b * k_sb + h * k_sh + q * k_sq)
        else:
            k = k_scalar
        # beats[i, j]: valid key j ranks before key i
        higher = x[None, :] > x[:, None]
        tied_before = (x[None, :] == x[:, None]) & (cols[None, :] < cols[:, None])
        beats = (higher | tied_before) & ok[None, :]
        rank = tl.sum(beats.to(tl.int32), axis=1)
        drop = (rank >= k) | (ok == 0)
        tl.store(out_ptr + row * K + cols, tl.where(drop, float("-inf"), x), mask=in_row)
        tl.store(drop_ptr + row * K + cols, drop.to(tl.int8), mask=in_row)


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
    _topk_drop_kernel[(batch * heads * queries,)](
        scores, valid_u8, k_tensor, out, drop,
        heads, queries, keys, k_scalar,
        *v_strides, *k_strides,
        HAS_VALID=valid is not None, K_IS_TENSOR=k_is_tensor,
        BLOCK=block, num_warps=8 if block >= 128 else 4,
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
