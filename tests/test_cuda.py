"""The GPU fast paths: the fused top-k kernel, lockstep dropout and LayerNorm, and CUDA-graph training steps.

They need a GPU (run them on one with ``pytest tests/test_cuda.py``); the kernel is also checked on
the CPU under Triton's interpreter where Triton is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import crisp
import crisp.training.cuda_graphs
from crisp.core import results
from crisp.sparsity import kernels
from crisp.sparsity.topk import MaskInfo, drop_mask, k_table
from crisp.training.cuda_graphs import GraphedTrainStep
from tests.conftest import ROOT, VOCAB, run_crisp, smoke_overrides, tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check_fused_matches_sort(device: str) -> None:
    """The fused kernel keeps exactly the keys the stable sort keeps, computes their softmax and
    passes gradients only through kept scores: ties, bf16, padding, all row lengths up to its limit."""
    generator = torch.Generator().manual_seed(0)

    def choose(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    for trial in range(60):
        b, h, q = (int(v) for v in torch.randint(1, 4, (3,), generator=generator))
        k_len = [1, 2, 5, 10, 17, 40, 66, 128, 300, 1024][trial % 10]
        s = choose([0.3, 0.6, 0.7, 0.8, 0.95])
        scaling = choose([1.0, 0.125, 32**-0.5])
        dtype = choose([torch.float32, torch.bfloat16, torch.float16])
        if trial % 3 == 0:  # few distinct values: many ties
            raw = torch.randint(-2, 3, (b, h, q, k_len), generator=generator).float()
        else:
            raw = torch.randn(b, h, q, k_len, generator=generator)
        raw = raw.to(device=device, dtype=dtype)
        lengths = torch.randint(1, k_len + 1, (b,), generator=generator).to(device)
        valid = (torch.arange(k_len, device=device) < lengths[:, None])[:, None, None, :] if trial % 4 else None
        upstream = torch.randn(b, h, q, k_len, generator=generator).to(device=device, dtype=dtype)

        leaf, ref_leaf = raw.clone().requires_grad_(), raw.clone().requires_grad_()
        probs = kernels.topk_softmax(leaf, valid, k_table(k_len, s, leaf.device), scaling)
        # the portable path: scale, mask, sort, fill, softmax
        scores = ref_leaf * scaling
        masked = scores if valid is None else scores.masked_fill(~valid, torch.finfo(dtype).min)
        drop = drop_mask(masked.detach(), MaskInfo(valid, k_len, scores.device), s)
        expected = torch.softmax(masked.float().masked_fill(drop, float("-inf")), -1)
        where = (trial, b, h, q, k_len, s, dtype)
        assert probs.dtype == dtype, where
        assert torch.equal(probs == 0, drop), where  # exactly the sort's keys survive
        tolerance = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.float16: {"rtol": 2e-3, "atol": 1e-3},
                     torch.bfloat16: {"rtol": 1e-2, "atol": 4e-3}}[dtype]
        torch.testing.assert_close(probs.float(), expected, **tolerance, msg=str(where))
        (probs.float() * upstream).sum().backward()
        (expected * upstream).sum().backward()
        assert not leaf.grad[drop].any(), where
        torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad.float(), **tolerance, msg=str(where))


def check_fused_runs_match_each_run_alone(device: str) -> None:
    """A batch of several runs (one block of rows each, a 2-D k table) gives each block exactly what
    that run's own table gives it alone, forward and backward, with padding and a 4-D mask."""
    generator = torch.Generator().manual_seed(1)
    cases = [(3, 2, 66, torch.float32), (2, 5, 17, torch.bfloat16), (4, 1, 128, torch.float32)]
    for runs, per_run, k_len, dtype in cases:
        sparsities = tuple(float(s) for s in torch.tensor([0.0, 0.8, 0.5, 0.95])[:runs])
        raw = torch.randn(runs * per_run, 2, 5, k_len, generator=generator).to(device=device, dtype=dtype)
        lengths = torch.randint(1, k_len + 1, (runs * per_run,), generator=generator).to(device)
        valid = torch.arange(k_len, device=device)[None, None, None, :] < lengths[:, None, None, None]
        upstream = torch.randn(raw.shape, generator=generator).to(device=device, dtype=dtype)
        leaf = raw.clone().requires_grad_()
        probs = kernels.topk_softmax(leaf, valid, k_table(k_len, sparsities, leaf.device), 0.125, runs=runs)
        (probs.float() * upstream).sum().backward()
        for run, s in enumerate(sparsities):
            rows = slice(run * per_run, (run + 1) * per_run)
            alone = raw[rows].clone().requires_grad_()
            expected = kernels.topk_softmax(alone, valid[rows], k_table(k_len, s, alone.device), 0.125)
            (expected.float() * upstream[rows]).sum().backward()
            assert torch.equal(probs[rows], expected), (runs, run, s)
            assert torch.equal(leaf.grad[rows], alone.grad), (runs, run, s)


def check_kernel_sees_the_keys_the_sort_sees(device: str) -> None:
    """crisp's attention function on the fused kernel and on the sort, for the rows that decoders and local
    windows make: causal rows with no mask passed (is_causal), grouped key/value heads, a causal window with a
    short sentence whose padding rows see no key. The same kept keys (k of each row's visible n, none outside),
    probabilities, outputs, statistics and (fp32) gradients, all finite."""
    from torch import nn

    from crisp.sparsity.attention import crisp_attention_forward
    from crisp.sparsity.topk import kept_keys

    generator = torch.Generator().manual_seed(2)
    module = nn.Module().eval()
    module.is_causal, module.crisp_sparsity, module.num_key_value_groups = True, 0.8, 2
    i = torch.arange(9, device=device)
    window = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3)  # itself and two keys back
    real = i[None, :] < torch.tensor([9, 4], device=device)[:, None]  # the second sentence: 4 tokens
    for dtype in (torch.float32, torch.bfloat16):
        for mask in (None, (window[None] & real[:, None, :])[:, None]):
            q = torch.randn(2, 4, 9, 8, generator=generator).to(device=device, dtype=dtype)
            k, v = (torch.randn(2, 2, 9, 8, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
            visible = (window[None] & real[:, None, :])[:, None] if mask is not None else (i[None, :] <= i[:, None])
            seen = {}
            for fused in ("1", "0"):
                os.environ["CRISP_FUSED_TOPK"] = fused
                leaf = q.clone().requires_grad_()
                out, probs = crisp_attention_forward(module, leaf, k, v, mask, scaling=8**-0.5)
                out.float().square().sum().backward()
                seen[fused] = (probs.detach(), out.detach(), leaf.grad, module.crisp_stats.clone())
            os.environ.pop("CRISP_FUSED_TOPK")
            (probs, out, grad, stats), (s_probs, s_out, s_grad, s_stats) = seen["1"], seen["0"]
            where = (dtype, mask is not None)
            assert all(torch.isfinite(x.float()).all() for x in (probs, out, grad)), where
            assert torch.equal(probs == 0, s_probs == 0), where
            counted = visible.expand_as(probs).diagonal(dim1=-2, dim2=-1)  # rows that see their own key
            n = visible.expand_as(probs).sum(-1)
            assert torch.equal(((probs > 0) & visible).sum(-1)[counted], kept_keys(n, 0.8)[counted]), where
            assert not (probs > 0)[visible.expand_as(probs).logical_not() & counted[..., None]].any(), where
            tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2}
            pairs = [(probs, s_probs), (out, s_out), (stats, s_stats)]
            pairs += [(grad, s_grad)] if dtype == torch.float32 else []  # the sort's bf16 softmax rounds its own way
            for a, b in pairs:
                torch.testing.assert_close(a.float(), b.float(), **tolerance, msg=str(where))


@cuda
def test_fused_kernel_matches_the_sort_on_the_gpu():
    check_fused_matches_sort("cuda")
    check_fused_runs_match_each_run_alone("cuda")
    check_kernel_sees_the_keys_the_sort_sees("cuda")


def check_under_the_triton_interpreter(*checks: str) -> None:
    """Run these checks of this module on the CPU under Triton's interpreter, in a fresh process
    (Triton reads ``TRITON_INTERPRET`` when a kernel is defined)."""
    pytest.importorskip("triton")
    code = f"from tests.test_cuda import {', '.join(checks)}; " + "; ".join(f"{check}('cpu')" for check in checks)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fused_kernel_matches_the_sort_under_the_triton_interpreter():
    check_under_the_triton_interpreter("check_fused_matches_sort", "check_fused_runs_match_each_run_alone")


def test_fused_kernel_sees_causal_windowed_and_grouped_rows_as_the_sort_under_the_triton_interpreter():
    check_under_the_triton_interpreter("check_kernel_sees_the_keys_the_sort_sees")


@cuda
def test_crisp_attention_uses_the_kernel_on_the_gpu_and_matches_the_sort(monkeypatch):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert"), attn_implementation="crisp")
    model = model.cuda().eval()
    crisp.set_sparsity(model, 0.8)
    ids = torch.randint(5, VOCAB, (4, 30), device="cuda")
    mask = (torch.arange(30, device="cuda") < torch.tensor([30, 12, 5, 21], device="cuda")[:, None]).long()
    calls = []
    kernel = kernels.topk_softmax
    monkeypatch.setattr(kernels, "topk_softmax", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    fused = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 3  # one launch per layer
    monkeypatch.setenv("CRISP_FUSED_TOPK", "0")
    sorted_ = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 3
    torch.testing.assert_close(fused, sorted_, rtol=0, atol=1e-6)


@cuda
@pytest.mark.parametrize("arch", ["llama", "mistral", "modernbert"])
def test_decoders_and_local_windows_use_the_kernel_on_the_gpu_stay_causal_and_match_the_sort(arch, monkeypatch):
    from tests.encoder_coverage import batch, build

    model = build(arch)[0].cuda()
    crisp.prepare(model)
    crisp.set_sparsity(model, 0.8)
    calls = []
    kernel = kernels.topk_softmax
    monkeypatch.setattr(kernels, "topk_softmax", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    for padded in (False, True):
        ids, mask = (x.cuda() for x in batch(padded))
        changed = ids.clone()
        changed[0, 9] = 5 if ids[0, 9] != 5 else 6
        with torch.no_grad():
            fused = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            moved = model(input_ids=changed, attention_mask=mask, output_hidden_states=True)
            monkeypatch.setenv("CRISP_FUSED_TOPK", "0")
            sorted_ = model(input_ids=ids, attention_mask=mask).logits
            monkeypatch.delenv("CRISP_FUSED_TOPK")
        assert calls and all(torch.isfinite(h).all() for h in fused.hidden_states)
        if arch != "modernbert":  # the decoders: no earlier position moves
            for a, b in zip(fused.hidden_states, moved.hidden_states, strict=True):
                assert (a[:, :9] - b[:, :9]).abs().max() <= 1e-6
        torch.testing.assert_close(fused.logits, sorted_, rtol=0, atol=1e-5)


def check_kernel_dropout_applies_each_runs_own_mask(device: str) -> None:
    """Lockstep dropout on the GPU draws and applies a run's mask in one launch and draws it again in
    the backward pass: the same mask as the run's ``keep_mask``, whatever the run's neighbours, in
    fp32 and bf16, with blocks that do not fill the kernel's."""
    from crisp.lockstep.dropout import RunProbabilities, RunRandom

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3 * 4, 5, 33, device=device, dtype=dtype, requires_grad=True)  # 660 per run
        grad = torch.randn_like(x)
        group, masks = RunRandom([3, 7, 11], device), RunRandom([3, 7, 11], device)
        for random in (group, masks):
            random.next_step()
            random.next_step()
        keep = masks.keep_mask(x.shape, 0.3, x.device)
        y = group.dropout(x, 0.3)
        y.backward(grad)
        assert 0.6 < keep.float().mean() < 0.8
        ulp = 0 if dtype == torch.float32 else 2**-7  # Triton's interpreter rounds bf16 its own way
        torch.testing.assert_close(y, (x.float() * keep * (1 / 0.7)).to(dtype), rtol=ulp, atol=0)
        torch.testing.assert_close(x.grad, (grad.float() * keep * (1 / 0.7)).to(dtype), rtol=ulp, atol=0)
        alone = RunRandom([7], device)
        alone.next_step()
        alone.next_step()
        assert torch.equal(alone.keep_mask(torch.Size([4, 5, 33]), 0.3, x.device), keep[4:8])
    # each run at its own probability (runs whose dropout differs share a group)
    probs = torch.tensor([0.0, 0.3, 0.6], device=device)
    p = RunProbabilities(0.6, probs, 1 / (1 - probs))
    x = torch.randn(3 * 4, 5, 33, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    group, masks = RunRandom([3, 7, 11], device), RunRandom([3, 7, 11], device)
    for random in (group, masks):
        random.next_step()
    keep, y = masks.keep_mask(x.shape, p, x.device), group.dropout(x, p)
    y.backward(grad)
    assert keep[:4].all() and 0.6 < keep[4:8].float().mean() < 0.8 and 0.3 < keep[8:].float().mean() < 0.5
    scale = p.scales.repeat_interleave(4)[:, None, None]
    torch.testing.assert_close(y, x * keep * scale, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grad * keep * scale, rtol=0, atol=0)


@cuda
def test_kernel_dropout_applies_each_runs_own_mask_on_the_gpu():
    check_kernel_dropout_applies_each_runs_own_mask("cuda")


def test_kernel_dropout_applies_each_runs_own_mask_under_the_triton_interpreter():
    check_under_the_triton_interpreter("check_kernel_dropout_applies_each_runs_own_mask")


def _probs_on(where: str, module, q, k, v, mask, seeds=(7,), runs=None) -> torch.Tensor:
    """crisp's attention probabilities on ``where`` (back on the CPU), drawing from streams at their first step."""
    from crisp.sparsity.attention import crisp_attention_forward
    from crisp.sparsity.streams import RunStreams, random_stream

    stream = RunStreams(list(seeds), where)
    stream.next_step()
    with random_stream(stream):
        return crisp_attention_forward(module, q.to(where), k.to(where), v.to(where), mask.to(where),
                                       crisp_runs=runs)[1].cpu()


def check_sparsifiers_match_the_cpu(device: str) -> None:
    """random, topp and entmax on the device: random keeps the keys it keeps on the CPU from the same streams
    (the stream's hash gives the same bits on both), in fp32 and bf16, a run in a lockstep batch as alone;
    topp keeps the smallest set reaching p of the device's own softmax; entmax is the CPU's within float
    rounding, zero on padding, rows summing to 1; each with padding and a causal mask."""
    from crisp.sparsity.attention import RunRows
    from tests import test_sparsifiers as contract

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 scores as the CPU computes them (no TF32)
    try:
        for mask_of in (contract.key_padding, contract.causal):
            mask = mask_of(contract.LENGTHS * 3, 13)
            for dtype in (torch.float32, torch.bfloat16):
                q, k, v = (x.to(dtype) for x in contract.qkv(3 * len(contract.LENGTHS), seed=11))
                sparsities = (0.8, 0.5, 0.8)
                on_cpu = _probs_on("cpu", contract.layer("random", sparsities), q, k, v, mask, (1, 2, 3), RunRows(3))
                here = _probs_on(device, contract.layer("random", sparsities), q, k, v, mask, (1, 2, 3), RunRows(3))
                assert torch.equal(here > 0, on_cpu > 0), (mask_of.__name__, dtype)
                tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 4e-3}
                torch.testing.assert_close(here.float(), on_cpu.float(), **tolerance)
                rows = slice(4, 8)  # the second run, alone
                alone = _probs_on(device, contract.layer("random", 0.5), q[rows], k[rows], v[rows], mask[rows], (2,))
                assert torch.equal(alone > 0, here[rows] > 0)
            q, k, v = contract.qkv(len(contract.LENGTHS), seed=12)
            mask = mask_of(contract.LENGTHS, 13)
            nucleus = _probs_on(device, contract.layer("topp", 0.5), q, k, v, mask)
            dense = torch.softmax(contract.masked_scores(q.to(device), k.to(device), mask.to(device)), -1).cpu()
            for b, h, row, _ in contract.query_rows(mask, 2):
                kept = set(torch.nonzero(nucleus[b, h, row]).flatten().tolist())
                assert kept == contract.reference_topp(dense[b, h, row].tolist(), 0.5), (b, h, row)
            for alpha in (1.5, 2.0, 1.25):
                here = _probs_on(device, contract.layer("entmax", alpha=alpha), q, k, v, mask)
                on_cpu = _probs_on("cpu", contract.layer("entmax", alpha=alpha), q, k, v, mask)
                torch.testing.assert_close(here, on_cpu, rtol=1e-5, atol=1e-6)
                assert not here.masked_select(~mask.expand_as(here)).any()
                torch.testing.assert_close(here.sum(-1), torch.ones(here.shape[:-1]), rtol=0, atol=1e-5)
    finally:
        torch.set_float32_matmul_precision(precision)


@cuda
def test_random_topp_and_entmax_on_the_gpu_match_the_cpu():
    check_sparsifiers_match_the_cpu("cuda")


@cuda
def test_a_cuda_graph_of_random_attention_draws_each_steps_keys_at_its_replay():
    """The stream's step lives on the device and advances inside the graph: each replay keeps the keys an
    eager forward keeps at that step, and another set than the replay before; the same for a lockstep batch."""
    from crisp.sparsity.attention import RunRows, crisp_attention_forward
    from crisp.sparsity.streams import RunStreams, random_stream
    from tests.test_sparsifiers import key_padding, layer, qkv

    q, k, v = (t.cuda() for t in qkv(8, seed=13))
    mask = key_padding([13, 9, 4, 1] * 2, 13).cuda()
    for seeds, sparsity, runs in (([5], 0.7, None), ([5, 6], (0.7, 0.5), RunRows(2))):
        stream, module = RunStreams(seeds, "cuda"), layer("random", sparsity)

        def step(stream=stream, module=module, runs=runs):
            stream.next_step()
            with random_stream(stream):
                return crisp_attention_forward(module, q, k, v, mask, crisp_runs=runs)[1]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # step 1, eagerly: the constants the graph captures by address exist now
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        replays = []
        for _ in range(3):
            graph.replay()
            replays.append(out > 0)
        eager = RunStreams(seeds, "cuda")
        eager.next_step()  # the warm-up's step
        for kept in replays:
            eager.next_step()
            with random_stream(eager):
                assert torch.equal(crisp_attention_forward(module, q, k, v, mask, crisp_runs=runs)[1] > 0, kept)
        assert not torch.equal(replays[0], replays[1]) and not torch.equal(replays[1], replays[2])


def check_run_layer_norm_matches_pytorch(device: str) -> None:
    """The one-launch LayerNorm with each run's scale and shift: PyTorch's output and gradients (input,
    every run's weight and bias), fp32 and bf16 inputs, a width that is no power of two, blocks of
    rows that do not fill the backward's programs."""
    from crisp.lockstep.layer_norm import run_layer_norm

    runs, rows, dim = 3, 37, 48
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(runs * rows, dim, device=device).mul(3).add(1).to(dtype).requires_grad_()
        weight = torch.randn(runs, dim, device=device, requires_grad=True)
        bias = torch.randn(runs, dim, device=device, requires_grad=True)
        grad = torch.randn(runs * rows, dim, device=device)
        y = run_layer_norm(x, weight, bias, 1e-12)
        y.backward(grad)
        fused_grads = [t.grad.clone() for t in (x, weight, bias)]
        for t in (x, weight, bias):
            t.grad = None
        normalised = F.layer_norm(x.float(), (dim,), eps=1e-12).view(runs, rows, dim)
        expected = (normalised * weight[:, None] + bias[:, None]).view(runs * rows, dim)
        expected.backward(grad)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        for fused, reference in zip(fused_grads, (x.grad, weight.grad, bias.grad), strict=True):
            assert fused.dtype == reference.dtype
            torch.testing.assert_close(fused, reference, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-4)


@cuda
def test_run_layer_norm_matches_pytorch_on_the_gpu():
    check_run_layer_norm_matches_pytorch("cuda")


def test_run_layer_norm_matches_pytorch_under_the_triton_interpreter():
    check_under_the_triton_interpreter("check_run_layer_norm_matches_pytorch")


@cuda
def test_a_fused_linear_under_autocast_computes_what_autocast_computes():
    """The output as autocast's own batched matmul gives it; the gradients of the fp32 input, weight
    and bias in fp32 straight from the matmuls, within bf16 rounding of autocast's."""
    from crisp.lockstep.fused import FusedLinear

    torch.manual_seed(0)
    fused = FusedLinear([torch.nn.Linear(48, 40) for _ in range(3)]).cuda()
    x = torch.randn(3 * 37, 48, device="cuda", requires_grad=True)
    grad = torch.randn(3 * 37, 40, device="cuda")
    results_ = []
    for ours in (True, False):
        for t in (x, fused.weight, fused.bias):
            t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if ours:
                y = fused(x)
            else:
                y = torch.baddbmm(fused.bias.unsqueeze(1), x.view(3, 37, 48), fused.weight).view(3 * 37, 40)
        y.backward(grad)
        results_.append([y, x.grad, fused.weight.grad, fused.bias.grad])
    (y, gx, gw, gb), (ref_y, ref_gx, ref_gw, ref_gb) = results_
    assert y.dtype == torch.bfloat16 and gx.dtype == gw.dtype == gb.dtype == torch.float32
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
    for ours, ref in ((gx, ref_gx), (gw, ref_gw), (gb, ref_gb)):
        torch.testing.assert_close(ours, ref, rtol=2**-8, atol=1e-5)


@cuda
def test_linears_that_share_an_input_cast_it_once_and_compute_what_each_computes_alone():
    from torch.utils._python_dispatch import TorchDispatchMode

    from crisp.lockstep.fused import FusedLinear, InputCasts

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    linears = [[torch.nn.Linear(32, 32) for _ in range(2)] for _ in range(3)]  # query, key, value of 2 runs
    x = torch.randn(2, 9, 32, device="cuda", requires_grad=True)
    outputs = {}
    for shared in (True, False):
        casts = InputCasts()
        qkv = [FusedLinear(runs, casts if shared else None).cuda() for runs in linears]
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16), Casts() as seen:
            ys = [linear(x) for linear in qkv]
        sum((y.float() * (i + 1)).sum() for i, y in enumerate(ys)).backward()
        outputs[shared] = (ys, x.grad.clone(), [linear.weight.grad for linear in qkv])
        assert seen.shapes.count(tuple(x.shape)) == (1 if shared else 3)
    (ys, gx, gws), (ref_ys, ref_gx, ref_gws) = outputs[True], outputs[False]
    for ours, ref in zip([*ys, gx, *gws], [*ref_ys, ref_gx, *ref_gws], strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    casts = InputCasts()
    query, key = (FusedLinear(runs, casts).cuda() for runs in linears[:2])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        query(x)
        with torch.no_grad():
            x.mul_(2)  # changed in place since its cast: cast again, not the stale copy
        torch.testing.assert_close(key(x), FusedLinear(linears[1]).cuda()(x), rtol=0, atol=0)


@cuda
def test_kept_weight_copies_follow_every_optimizer_step_and_a_run_leaving():
    """With the bf16 weight copies tied to the optimizer, every forward is bit for bit the forward that
    casts the weights afresh: after fused AdamW steps (which leave no trace in a version counter) and
    after the weights' storage changed (a run left the group)."""
    from crisp.lockstep.fused import FusedLinear, WeightCopies

    torch.manual_seed(0)
    copies = WeightCopies()
    fused = FusedLinear([torch.nn.Linear(48, 40) for _ in range(3)], copies=copies).cuda()
    optimizer = torch.optim.AdamW(fused.parameters(), lr=1e-2, fused=True)
    copies.follow(optimizer)
    x = torch.randn(3, 37, 48, device="cuda")

    def forward(kept: bool) -> torch.Tensor:
        copies.active = kept
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fused(x)

    for _ in range(3):
        torch.testing.assert_close(forward(True), forward(False), rtol=0, atol=0)
        copies.active = True
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused(x).float().square().mean().backward()
        optimizer.step()
    with torch.no_grad():  # run 1 leaves: new storage, one run fewer
        for param in fused.parameters():
            param.data = param.data[[0, 2]].clone()
    x = x[[0, 2]]
    torch.testing.assert_close(forward(True), forward(False), rtol=0, atol=0)


@cuda
def test_query_key_and_value_as_one_matmul_under_autocast_compute_what_each_computes_alone():
    from crisp.lockstep.fused import FusedLinear, FusedProjections, ProjectionOf

    torch.manual_seed(0)
    linears = [[torch.nn.Linear(32, 32) for _ in range(2)] for _ in range(3)]  # query, key, value of 2 runs
    owner = FusedProjections(linears, ["query", "key", "value"]).cuda()
    fused = [owner, ProjectionOf(owner, 1), ProjectionOf(owner, 2)]
    alone = [FusedLinear(runs).cuda() for runs in linears]
    x = torch.randn(2, 9, 32, device="cuda", requires_grad=True)
    outputs = []
    for qkv in (fused, alone):
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ys = [linear(x) for linear in qkv]
        sum((y.float() * (i + 1)).sum() for i, y in enumerate(ys)).backward()
        outputs.append((ys, x.grad.clone()))
    (ys, gx), (ref_ys, ref_gx) = outputs
    for y, ref in zip(ys, ref_ys, strict=True):
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, ref_gx, rtol=2**-8, atol=1e-5)  # one matmul's sum against three
    for k, linear in enumerate(alone):
        # the same fp32 sums of the same products, perhaps in another order
        torch.testing.assert_close(owner.weight.grad.split(32, dim=-1)[k], linear.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(owner.bias.grad.split(32, dim=-1)[k], linear.bias.grad, rtol=1e-5, atol=1e-6)


def _tiny_bert(seed: int, dropout: float = 0.0):
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("bert")
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="crisp").cuda().train()
    crisp.set_sparsity(model, 0.5)
    return model


def _batches(widths: list[int]) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for width in widths:
        lengths = torch.randint(2, width + 1, (8,), generator=generator)
        mask = (torch.arange(width) < lengths[:, None]).long()
        ids = torch.randint(5, VOCAB, (8, width), generator=generator) * mask
        labels = torch.randint(0, 2, (8,), generator=generator)
        batches.append({k: v.cuda() for k, v in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))})
    return batches


def _loss_fn(model):
    def fn(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"]), logits
    return fn


def _train_graphed(model, batches) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = GraphedTrainStep(_loss_fn(model), list(model.parameters()))
    losses = []
    for batch in batches:
        loss, _ = step(batch)
        optimizer.step()
        losses.append(loss.item())
    return losses, step


@cuda
@pytest.mark.parametrize(("grads_share", "stats"), [(0.2, {"graphs": 3, "eager_steps": 3}),
                                                    (1e-9, {"graphs": 1, "eager_steps": 8})])
def test_graphed_steps_train_exactly_like_eager_steps(monkeypatch, grads_share, stats):
    """Several shapes interleaved: every replay must hand the optimizer its own graph's gradients; shapes
    met once the graphs' gradients fill their share of the memory run eagerly, the same steps."""
    monkeypatch.setattr(crisp.training.cuda_graphs, "GRADS_SHARE", grads_share)
    torch.set_float32_matmul_precision("highest")
    batches = _batches([8, 16, 8, 16, 24, 8, 24, 16, 8, 16, 24, 8])
    eager_model, graphed_model = _tiny_bert(0), _tiny_bert(0)
    optimizer = torch.optim.AdamW(eager_model.parameters(), lr=1e-3, fused=True)
    eager_losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = _loss_fn(eager_model)(batch)
        loss.backward()
        optimizer.step()
        eager_losses.append(loss.item())
    graphed_losses, step = _train_graphed(graphed_model, batches)
    assert step.stats == stats  # one warm-up step per shape, then replays (or eager steps)
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for p, q in zip(graphed_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@cuda
def test_graphed_dropout_reproduces_from_the_seed():
    batches = _batches([8, 16, 8, 16, 8, 16])
    runs = []
    for _ in range(2):
        model = _tiny_bert(0, dropout=0.1)
        torch.manual_seed(3)
        runs.append(_train_graphed(model, batches)[0])
    assert runs[0] == runs[1]
    model = _tiny_bert(0, dropout=0.1)
    torch.manual_seed(4)
    assert _train_graphed(model, batches)[0] != runs[0]  # the dropout masks really are random


@cuda
def test_a_gpu_run_uses_cuda_graphs_and_learns(tmp_path):
    # the smoke preset (64 steps) on the GPU preset: bf16 autocast inside the captured graphs
    proc = run_crisp("experiment=smoke", "trainer=gpu", "sparsity=0.5", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = results.read(tmp_path)
    assert record["status"] == results.COMPLETED
    assert record["timing"]["cuda_graphs"]["graphs"] >= 1
    assert record["timing"]["pad_to_multiple_of"] == 16
    assert record["final"]["val_acc"] > 0.8


@cuda
def test_a_lockstep_group_with_runs_of_their_own_lr_and_dropout_trains_on_the_gpu(tmp_path):
    # CUDA graphs, bf16, the Triton dropout at each run's probability, the per-run AdamW, all in one group
    proc = run_crisp("-m", "experiment=smoke", "trainer=gpu", "hydra/launcher=lockstep", "sparsity=0,0.5",
                     "optim.lr=1e-3,2e-3", "dropout.hidden=0,0.1", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [results.read(p) for p in results.find_all(tmp_path)]
    assert len(found) == 8 and {r["timing"]["lockstep"]["runs"] for r in found} == {8}
    assert all(r["status"] == results.COMPLETED and r["final"]["val_acc"] > 0.8 for r in found)
    assert all(r["timing"]["cuda_graphs"]["graphs"] >= 1 for r in found)


def _mps_processes() -> list[str]:
    """Live MPS daemons and servers (a stopped daemon may linger as a zombie where PID 1 reaps nothing)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(") ")
        except OSError:
            continue
        if "(nvidia-cuda-mps" in fields[0] and not fields[1].startswith("Z"):
            found.append(fields[0])
    return found


@cuda
def test_a_short_mps_grid_ends_with_its_report_and_leaves_nothing_behind(tmp_path):
    from tests.test_sweep import workers_of

    overrides = ["trainer=gpu", "hydra/launcher=parallel", "hydra.launcher.n_jobs=4", "sweep.mps=true"]
    proc = run_crisp("-m", *smoke_overrides(tmp_path, *overrides, sweep=True), "seed=1,2,3,4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MPS daemon started" in proc.stdout and "MPS daemon stopped" in proc.stdout
    assert all((tmp_path / name).stat().st_size > 0 for name in ("report.md", "report.csv", "report.png"))
    assert len([p for p in results.find_all(tmp_path) if results.read(p)["status"] == "completed"]) == 4
    assert not workers_of(tmp_path) and not _mps_processes()


@cuda
def test_an_mps_daemon_left_by_a_killed_sweep_is_stopped_by_the_next(tmp_path):
    import signal
    import time

    from tests.test_sweep import workers_of

    overrides = smoke_overrides(tmp_path, "trainer=gpu", "hydra/launcher=parallel", "sweep.mps=true", sweep=True)
    killed = subprocess.Popen([sys.executable, "-m", "crisp.run", "-m", *overrides, "trainer.max_epochs=50",
                               "seed=1,2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 120
    while len(workers_of(tmp_path)) < 2 and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    deadline = time.time() + 30
    while workers_of(tmp_path) and time.time() < deadline:
        time.sleep(0.5)
    assert not workers_of(tmp_path) and _mps_processes()  # the workers died with it; the daemon did not
    proc = run_crisp("-m", *overrides, "seed=1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "found an MPS daemon left by an earlier sweep" in proc.stdout
    assert not _mps_processes()
