"""Fused top-k softmax for GPU training steps, in Triton.

Dense eager attention turns raw scores into probabilities in three kernels (scale, add the mask,
softmax); the portable sparsifier (``crisp.sparsity.topk.drop_mask``) adds a stable sort, a scatter
and a fill on top, in a step that is bound by launches and memory passes. This kernel does all of
it in one launch for rows of up to :data:`MAX_KEYS` keys, and its backward is one launch too.

Per query row it scales the scores (rounded to their dtype, as a separate multiply would round
them), finds the k-th highest valid score by a radix search over the bits of the scores' ordered
integer image (one comparison and one row sum per bit, at most 16 bits for bf16 and 32 for fp32,
fewer once every row of the program has a threshold with exactly k keys at or above it), keeps
every score above it and, of the scores equal to it, the first ones by position (a stable
descending sort's order) until k are kept, and writes the softmax over the kept keys. ``k`` comes
from crisp's exact host-computed table, indexed by the row's number of valid keys (and, for a batch
that holds several lockstep runs, by the row's run: one table row per run).

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

# longest row the kernel holds in registers; longer rows take the portable sort
MAX_KEYS = 1024
# low bits of an fp32 that are always zero for values of the dtype: the radix search skips them
_ZERO_LOW_BITS = {torch.float32: 0, torch.bfloat16: 16, torch.float16: 13}


def available(scores: torch.Tensor) -> bool:
    """Whether the fused kernel can take these scores."""
    return (
        triton is not None
        and (scores.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
        and scores.size(-1) <= MAX_KEYS
        and scores.dim() == 4
        and scores.dtype in _ZERO_LOW_BITS
        and os.environ.get("CRISP_FUSED_TOPK", "1") != "0"
    )


if triton is not None:

    @triton.jit
    def _row_coordinates(R, K, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < R
        in_row = row_ok[:, None] & (cols[None, :] < K)
        return rows, row_ok, cols, in_row, rows[:, None] * K + cols[None, :]

    @triton.jit
    def _topk_softmax_kernel(
        scores_ptr, valid_ptr, table_ptr, probs_ptr,
        R, H, Q, K, scaling, rows_per_run, table_stride,
        v_sb, v_sh, v_sq, v_sk,
        HAS_VALID: tl.constexpr, LOW_BITS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    ):
        # ROWS query rows (of any head and sentence) per program, a row's keys along the block
        rows, row_ok, cols, in_row, offsets = _row_coordinates(R, K, BLOCK, ROWS)
        raw = tl.load(scores_ptr + offsets, mask=in_row, other=0.0)
        # the scaled score as its dtype holds it, so ties are those a separate multiply would make
        x = raw.to(tl.float32) * scaling
        if raw.dtype == tl.bfloat16:  # round to nearest even by hand: Triton's interpreter truncates
            bits = x.to(tl.uint32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            x = x.to(raw.dtype).to(tl.float32)
        x = tl.where(x == 0, 0.0, x)  # -0.0 and 0.0 tie, as in a sort
        ok = in_row
        b = rows // (Q * H)
        if HAS_VALID:
            q = rows % Q
            h = (rows // Q) % H
            where = (b * v_sb + h * v_sh + q * v_sq)[:, None] + cols[None, :] * v_sk
            ok = ok & (tl.load(valid_ptr + where, mask=in_row, other=0) != 0)
        n = tl.sum(ok.to(tl.int32), axis=1)
        k = tl.load(table_ptr + (b // rows_per_run) * table_stride + n, mask=row_ok, other=1).to(tl.int32)
        # an unsigned image of x with the same order; invalid keys at 0, below every valid one
        bits = x.to(tl.uint32, bitcast=True)
        key = tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000) >> LOW_BITS
        key = tl.where(ok, key, 0)
        # a threshold t with exactly k keys >= t or, failing that (ties), the k-th highest key: the
        # largest t with at least k keys >= t, decided bit by bit from the top until every row of
        # the program has exactly k (random scores: after about half of the bits)
        kth = tl.zeros_like(k).to(tl.uint32)
        at_least = tl.where(row_ok, n, k)  # keys >= kth
        bit = 31 - LOW_BITS
        while (bit >= 0) & (tl.max(at_least - k, axis=0) > 0):
            candidate = kth | (tl.full([], 1, tl.uint32) << bit)
            count = tl.sum((key >= candidate[:, None]).to(tl.int32), axis=1)
            kth = tl.where(count >= k, candidate, kth)
            at_least = tl.where(count >= k, count, at_least)
            bit -= 1
        # keep every key above it, and of those equal to it the first (k - #above) by position
        above = ok & (key > kth[:, None])
        tied = ok & (key == kth[:, None])
        need = k - tl.sum(above.to(tl.int32), axis=1)
        keep = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=1) <= need[:, None]))
        kept = tl.where(keep, x, float("-inf"))
        e = tl.exp(kept - tl.max(kept, axis=1)[:, None])
        probs = e / tl.sum(e, axis=1)[:, None]
        tl.store(probs_ptr + offsets, probs.to(probs_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def _softmax_backward_kernel(
        probs_ptr, grad_ptr, out_ptr, R, K, scaling, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    ):
        # d scores = scaling * p * (g - sum(g * p)): zero wherever p is, so for every dropped key
        _, _, _, in_row, offsets = _row_coordinates(R, K, BLOCK, ROWS)
        p = tl.load(probs_ptr + offsets, mask=in_row, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offsets, mask=in_row, other=0.0).to(tl.float32)
        d = scaling * p * (g - tl.sum(g * p, axis=1)[:, None])
        tl.store(out_ptr + offsets, d.to(out_ptr.dtype.element_ty), mask=in_row)


def launch_config(keys: int) -> tuple[int, int, int]:
    """(block width, rows per program, warps per program) for rows of ``keys`` scores.

    One warp per program: each search step sums every row, and a row spread over several warps
    would meet in shared memory on each of them. Where ``keys`` is not a multiple of 16 (66, the
    longest SST-2 sentence) Triton lays a row across all of a program's warps: at 32x12x66 fp32 on
    an H100 the forward took 79 us with 4 warps and 16 rows, 33 us with 1 warp and 4 rows. With 512
    scores per program, 1 warp was also the fastest or within 10% of it at every other benchmark
    shape.
    """
    block = max(16, triton.next_power_of_2(keys))
    return block, max(1, 512 // block), 1


class _FusedTopKSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, valid, k_table, scaling, runs):
        batch, heads, queries, keys = scores.shape
        probs = torch.empty_like(scores)
        if valid is not None:
            valid = valid.expand(batch, heads, queries, keys)
            valid_u8, v_strides = (valid.view(torch.uint8) if valid.dtype == torch.bool else valid), valid.stride()
        else:
            valid_u8, v_strides = scores, (0, 0, 0, 0)
        rows = batch * heads * queries
        block, per_program, warps = launch_config(keys)
        _topk_softmax_kernel[(triton.cdiv(rows, per_program),)](
            scores, valid_u8, k_table, probs, rows, heads, queries, keys, scaling,
            batch // runs, k_table.stride(0) if k_table.dim() == 2 else 0, *v_strides,
            HAS_VALID=valid is not None, LOW_BITS=_ZERO_LOW_BITS[scores.dtype], BLOCK=block, ROWS=per_program,
            num_warps=warps,
        )
        ctx.save_for_backward(probs)
        ctx.scaling = scaling
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        (probs,) = ctx.saved_tensors
        grad_scores = torch.empty_like(probs)
        keys = probs.size(-1)
        rows = probs.numel() // keys
        block, per_program, warps = launch_config(keys)
        _softmax_backward_kernel[(triton.cdiv(rows, per_program),)](
            probs, grad_probs.contiguous(), grad_scores, rows, keys, ctx.scaling,
            BLOCK=block, ROWS=per_program, num_warps=warps,
        )
        return grad_scores, None, None, None, None


def topk_softmax(scores: torch.Tensor, valid: torch.Tensor | None, k_table: torch.Tensor, scaling: float = 1.0,
                 runs: int = 1):
    """``softmax(scores * scaling)`` over each row's k best valid keys; every other key gets 0.

    ``scores`` are raw ``(batch, heads, queries, keys)`` scores; ``valid`` broadcasts to them
    (True = key may be attended); ``k_table[n]`` is the number of keys kept in a row of ``n`` valid
    keys (see :func:`crisp.sparsity.topk.kept_keys`); a 2-D ``k_table[run, n]`` serves a batch whose rows are
    ``runs`` equal blocks, one per run. Gradients flow only through kept scores.
    """
    if k_table.dim() == 2 and k_table.size(0) != runs:
        raise ValueError(f"k_table has {k_table.size(0)} rows for {runs} run(s)")
    return _FusedTopKSoftmax.apply(scores.contiguous(), valid, k_table, float(scaling), runs)
