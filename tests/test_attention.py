"""The sparsifier's exact semantics (crisp/sparsity/topk.py) on tiny DistilBERT and BERT."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crisp
from crisp.sparsity.attention import crisp_attention_forward
from crisp.sparsity.topk import kept_keys, topk_keep_mask
from tests.conftest import VOCAB, tiny_model


def reference_k(n: int, s: float) -> int:
    """k from exact rational arithmetic on the decimal the user typed."""
    return max(1, n - math.floor(Fraction(str(s)) * n))


def padded_batch(lengths, total=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = total or max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


@pytest.mark.parametrize(("n", "s", "k"), [(10, 0.7, 3), (10, 0.8, 2), (5, 0.6, 2), (10, 0.0, 10), (1, 0.9, 1),
                                           (3, 0.99, 1), (100, 0.7, 30), (20, 0.35, 13), (7, 0.5, 4)])
def test_kept_keys_examples(n, s, k):
    assert kept_keys(n, s) == k
    assert kept_keys(torch.tensor([n]), s).item() == k


def test_kept_keys_matches_exact_arithmetic_everywhere():
    sparsities = [round(i / 100, 2) for i in range(100)] + [0.125, 0.333, 0.875]
    n = torch.arange(1, 513)
    for s in sparsities:
        expected = torch.tensor([reference_k(int(v), s) for v in n])
        assert torch.equal(kept_keys(n, s), expected), s
        assert all(kept_keys(int(v), s) == int(e) for v, e in zip(n[:64], expected[:64], strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exactly_k_survive_ties(dtype):
    scores = torch.zeros(2, 3, 10, 10, dtype=dtype)  # every score tied
    scores[1, :, :, 4:] = 1.0  # ties among the top group too
    keep = topk_keep_mask(scores, None, 0.7)
    assert (keep.sum(-1) == 3).all()
    # deterministic: the lowest key positions win a tie
    assert keep[0, :, :, :3].all() and not keep[0, :, :, 3:].any()
    assert keep[1, :, :, 4:7].all() and keep[1].sum() == 3 * 3 * 10
    assert torch.equal(keep, topk_keep_mask(scores.clone(), None, 0.7))


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=4),
    heads=st.integers(1, 3),
    s=st.integers(0, 999).map(lambda i: i / 1000),  # decimals as users type them
    tie_levels=st.one_of(st.none(), st.integers(1, 4)),
    seed=st.integers(0, 2**16),
)
def test_topk_property(lengths, heads, s, tie_levels, seed):
    """Exactly k kept per valid row, never padding, and every kept score >= every dropped valid one."""
    g = torch.Generator().manual_seed(seed)
    total = max(lengths) + 2
    scores = torch.randn(len(lengths), heads, total, total, generator=g)
    if tie_levels is not None:  # few distinct values: ties everywhere
        scores = torch.round(scores * tie_levels) / tie_levels
    valid = torch.zeros(len(lengths), 1, total, total, dtype=torch.bool)
    for i, n in enumerate(lengths):
        valid[i, :, :, :n] = True
    masked = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    keep = topk_keep_mask(masked, valid, s)
    for i, n in enumerate(lengths):
        k = reference_k(n, s)
        assert (keep[i].sum(-1) == k).all()
        assert not keep[i, :, :, n:].any()
        row_scores, row_keep = scores[i, :, :, :n], keep[i, :, :, :n]
        kept_min = row_scores.masked_fill(~row_keep, math.inf).amin(-1)
        dropped_max = row_scores.masked_fill(row_keep, -math.inf).amax(-1)
        assert (kept_min >= dropped_max).all()


def test_dense_equals_eager(arch):
    crisp_model, eager_model = tiny_model(arch, "crisp"), tiny_model(arch, "eager")
    # both really ran what they claim: separate configs, crisp records its stats, eager never calls crisp
    assert eager_model.config is not crisp_model.config
    assert eager_model.config._attn_implementation == "eager"
    ids, mask = padded_batch([9, 5, 12])
    crisp.set_sparsity(crisp_model, 0.0)
    dense = crisp_model(input_ids=ids, attention_mask=mask).logits
    eager = eager_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(dense, eager, atol=1e-6, rtol=0)
    assert all(hasattr(m, "crisp_stats") for m in crisp.sparsity.families.attention_modules(crisp_model))
    assert not any(hasattr(m, "crisp_stats") for m in crisp.sparsity.families.attention_modules(eager_model))
    crisp.set_sparsity(crisp_model, 0.8)
    sparse = crisp_model(input_ids=ids, attention_mask=mask).logits
    assert (sparse - eager).abs().max() > 1e-4  # sparsity really changes the computation


def test_sentence_independent_of_batch_padding(arch):
    model = tiny_model(arch)
    crisp.set_sparsity(model, 0.8)
    ids, mask = padded_batch([7, 20, 13], total=24, seed=3)
    batched = model(input_ids=ids, attention_mask=mask).logits
    for i, n in enumerate([7, 20, 13]):
        alone = model(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n]).logits
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_gradients_only_through_kept_scores():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 4, generator=g) for _ in range(3))
    module = torch.nn.Module()
    module.crisp_sparsity = 0.75
    scores = q @ k.transpose(2, 3) * 4**-0.5
    keep = topk_keep_mask(scores, None, 0.75)  # 2 of 8 per row
    # an additive float mask is added to the scores, so its gradient is the scores' gradient
    per_head = torch.zeros(2, 2, 8, 8, requires_grad=True)
    out, _ = crisp_attention_forward(module, q, k, v, per_head)
    out.pow(2).sum().backward()
    assert (per_head.grad[~keep] == 0).all()
    assert (per_head.grad[keep] != 0).float().mean() > 0.9


def test_apply_in_eval_false_is_dense_in_eval(arch):
    model, reference = tiny_model(arch), tiny_model(arch)
    ids, mask = padded_batch([6, 11])
    crisp.set_sparsity(reference, 0.0)
    dense = reference(input_ids=ids, attention_mask=mask).logits
    crisp.set_sparsity(model, 0.8)
    crisp.configure(model, apply_in_eval=False)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, dense, atol=0, rtol=0)
    assert all(s.achieved_sparsity == 0 for s in crisp.attention_stats(model))
    model.train()
    model(input_ids=ids, attention_mask=mask)
    assert all(s.achieved_sparsity > 0.5 for s in crisp.attention_stats(model))


def test_attention_stats_counts_valid_pairs_only():
    model = tiny_model("distilbert")
    crisp.set_sparsity(model, 0.8)
    ids, mask = padded_batch([6, 10])
    model(input_ids=ids, attention_mask=mask)
    # n=6 keeps 2 (4 zeros per row, 6 rows); n=10 keeps 2 (8 zeros, 10 rows): 104 / 136 valid pairs
    for layer in crisp.attention_stats(model):
        assert layer.achieved_sparsity == pytest.approx(104 / 136)
        assert 0 < layer.entropy < 1
    crisp.set_sparsity(model, 0.0)
    model(input_ids=ids, attention_mask=mask)
    assert all(layer.achieved_sparsity == 0 for layer in crisp.attention_stats(model))


def test_per_layer_sparsity_list():
    model = tiny_model("bert")
    assert crisp.set_sparsity(model, [0.0, 0.5, 0.9]) == [0.0, 0.5, 0.9]
    ids, mask = padded_batch([10])
    model(input_ids=ids, attention_mask=mask)
    achieved = [s.achieved_sparsity for s in crisp.attention_stats(model)]
    assert achieved == pytest.approx([0.0, 0.5, 0.9])


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "abc", None, True, float("inf")])
def test_set_sparsity_rejects_bad_values(bad):
    model = tiny_model("distilbert")
    with pytest.raises(ValueError, match=r"sparsity=.*\[0, 1\)") as err:
        crisp.set_sparsity(model, bad)
    assert repr(bad) in str(err.value)


def test_set_sparsity_errors_name_the_problem():
    with pytest.raises(ValueError, match="3 attention layers"):
        crisp.set_sparsity(tiny_model("bert"), [0.1, 0.2])
    with pytest.raises(ValueError, match="attn_implementation='crisp'"):
        crisp.set_sparsity(tiny_model("bert", attn="eager"), 0.5)


def test_a_batch_of_runs_gives_each_run_its_own_sparsity_and_statistics():
    """Lockstep: the batch's rows are one block per run, each layer has one sparsity per run."""
    from crisp.sparsity.attention import RunRows

    g = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(6, 2, 9, 8, generator=g) for _ in range(3))
    valid = torch.arange(9)[None, None, None, :] < torch.tensor([9, 4, 7, 2, 9, 5])[:, None, None, None]
    module = torch.nn.Module()
    module.training, module.crisp_track_stats = False, True
    module.crisp_sparsity = (0.0, 0.7, 0.5)
    out, probs = crisp_attention_forward(module, query, key, value, valid, crisp_runs=RunRows(count=3))
    stats = module.crisp_stats
    assert stats.shape == (3, 2)
    for run, s in enumerate(module.crisp_sparsity):
        rows = slice(2 * run, 2 * run + 2)
        alone = torch.nn.Module()
        alone.training, alone.crisp_sparsity = False, s
        expected_out, expected_probs = crisp_attention_forward(alone, query[rows], key[rows], value[rows], valid[rows])
        torch.testing.assert_close(out[rows], expected_out, rtol=0, atol=0)
        assert torch.equal(probs[rows] == 0, expected_probs == 0)
        torch.testing.assert_close(stats[run], alone.crisp_stats)
