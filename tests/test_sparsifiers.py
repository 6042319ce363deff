"""Each sparsifier's contract (DESIGN.md, "The sparsifier"; issue 34) on random scores with padding and causal masks."""

from __future__ import annotations

import math
import random as pyrandom
import textwrap

import entmax as entmax_library
import pytest
import torch
from torch import nn

import crisp
from crisp.sparsity import registry
from crisp.sparsity.attention import RunRows, crisp_attention_forward
from crisp.sparsity.streams import RunStreams, TokenPlaces, hash32, random_stream
from crisp.sparsity.topk import kept_keys
from tests.conftest import tiny_model
from tests.test_attention import padded_batch, reference_k

LENGTHS = [1, 4, 9, 13]


def qkv(batch: int, heads: int = 2, length: int = 13, seed: int = 0, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, length, dim, generator=g) for _ in range(3))


def key_padding(lengths: list[int], total: int) -> torch.Tensor:
    """(batch, 1, 1, keys): True where the key is a real token."""
    return (torch.arange(total) < torch.tensor(lengths)[:, None])[:, None, None, :]


def causal(lengths: list[int], total: int) -> torch.Tensor:
    """(batch, 1, queries, keys): a real key at or before the query."""
    return key_padding(lengths, total) & torch.ones(total, total, dtype=torch.bool).tril()


def layer(name: str, parameter: float | tuple = 0.0, training: bool = True, layer_index: int = 0, **params):
    """An attention module as crisp.set_sparsifier leaves one (without a model around it)."""
    module = nn.Module()
    module.train(training)
    entry = registry.SPARSIFIERS[name]
    module.crisp_sparsifier, module.crisp_layer = name, layer_index
    module.crisp_sparsifier_params = {**entry.defaults(), **params}
    module.crisp_apply_in_eval = True
    module.crisp_sparsity = parameter if entry.uses_sparsity else 0.0
    return module


def probs_of(module, q, k, v, mask, runs: RunRows | None = None) -> torch.Tensor:
    return crisp_attention_forward(module, q, k, v, mask, crisp_runs=runs)[1]


def masked_scores(q, k, mask) -> torch.Tensor:
    """The scores a sparsifier receives: scaled, the keys a row may not see at the dtype's lowest."""
    scores = q @ k.transpose(2, 3) * q.size(-1) ** -0.5
    return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)


def query_rows(mask: torch.Tensor, heads: int) -> list[tuple[int, int, int, int]]:
    """(example, head, query, n) of every query row with at least one key to see, n its visible keys."""
    full = mask.expand(mask.size(0), heads, mask.size(-1), mask.size(-1))
    n = full.sum(-1)
    return [(b, h, q, int(n[b, h, q])) for b, h, q in zip(*torch.nonzero(n).T.tolist(), strict=True)]


# -------------------------------------------------------------------------------------------------------- random


@pytest.mark.parametrize("mask_of", [key_padding, causal], ids=["padding", "causal"])
@pytest.mark.parametrize("s", [0.3, 0.5, 0.7, 0.8, 0.95])
def test_random_keeps_exactly_n_minus_k_zeros_per_valid_row_and_never_padding(mask_of, s):
    q, k, v = qkv(len(LENGTHS))
    mask = mask_of(LENGTHS, 13)
    with random_stream(RunStreams([7], "cpu")):
        probs = probs_of(layer("random", s), q, k, v, mask)
    assert not probs.masked_select(~mask.expand_as(probs)).any()  # nothing a row may not see
    scores = masked_scores(q, k, mask)
    for b, h, row, n in query_rows(mask, 2):
        kept = probs[b, h, row] > 0
        assert int(kept.sum()) == reference_k(n, s), (b, h, row, n)
        # the kept keys' softmax, renormalized over them
        expected = torch.softmax(scores[b, h, row].masked_fill(~kept, -math.inf), -1)
        torch.testing.assert_close(probs[b, h, row], expected)


def _kept(seed: int, steps: int, forwards: int = 1, lengths=LENGTHS, s: float = 0.7) -> list[torch.Tensor]:
    """The kept keys of each forward in the last of ``steps`` training steps of a stream seeded ``seed``."""
    q, k, v = qkv(len(lengths))
    stream, module = RunStreams([seed], "cpu"), layer("random", s)
    for _ in range(steps):
        stream.next_step()
    with random_stream(stream):
        return [probs_of(module, q, k, v, key_padding(lengths, 13)) > 0 for _ in range(forwards)]


def test_random_draws_the_same_keys_for_the_same_seed_and_step_and_other_keys_otherwise():
    first, again = _kept(1, steps=3, forwards=2)
    assert torch.equal(first, _kept(1, steps=3)[0])  # reproducible: seed and step
    assert not torch.equal(first, _kept(2, steps=3)[0])  # another seed
    assert not torch.equal(first, _kept(1, steps=4)[0])  # another step
    assert not torch.equal(first, again)  # redrawn every forward


def test_random_draws_are_uniform_over_the_keys_a_row_may_see():
    """One key of five kept, over 21,000 rows of one stream: each visible key about a fifth of the time."""
    rows, total = 3000, 7
    q = k = v = torch.zeros(rows, 1, total, 4)  # every score tied: only the draw decides
    with random_stream(RunStreams([3], "cpu")):
        probs = probs_of(layer("random", 0.8), q, k, v, key_padding([5] * rows, total))
    counts = (probs > 0).sum((0, 1, 2)).float()
    draws = rows * total  # each query row keeps one of its five keys
    assert counts[5:].sum() == 0 and counts.sum() == draws
    assert ((counts[:5] / draws) - 0.2).abs().max() < 0.012  # over 4 standard deviations of a fair draw


def test_each_run_of_a_lockstep_batch_draws_its_own_keys_as_it_would_alone():
    """A batch of three runs (one block of rows each, one sparsity each): each block keeps the keys its run
    keeps alone, whichever runs share the batch; blocks of equal inputs but other seeds keep other keys."""
    per_run = len(LENGTHS)
    q, k, v = (torch.cat([t] * 3) for t in qkv(per_run))
    mask = key_padding(LENGTHS * 3, 13)
    sparsities = (0.7, 0.7, 0.5)

    def kept(seeds, sparsity, runs):
        stream = RunStreams(seeds, "cpu")
        stream.next_step()
        rows = slice(0, per_run * len(seeds))
        with random_stream(stream):
            return probs_of(layer("random", sparsity), q[rows], k[rows], v[rows], mask[rows], runs) > 0

    group = kept([11, 22, 33], sparsities, RunRows(3))
    for run, seed in enumerate([11, 22, 33]):
        rows = slice(run * per_run, (run + 1) * per_run)
        assert torch.equal(group[rows], kept([seed], sparsities[run], None)), seed
    assert not torch.equal(group[:per_run], group[per_run : 2 * per_run])  # seeds 11 and 22, same inputs
    other = kept([11, 44], sparsities[:2], RunRows(2))
    assert torch.equal(other[:per_run], group[:per_run])  # run 11 keeps its keys beside other runs


def test_a_batch_of_runs_without_its_streams_is_refused():
    q, k, v = qkv(2)
    with pytest.raises(ValueError, match="each run's own stream"):
        probs_of(layer("random", (0.5, 0.5)), q, k, v, key_padding([13, 9], 13), RunRows(2))
    with random_stream(RunStreams([1, 2, 3], "cpu")), pytest.raises(ValueError, match="3 run"):
        probs_of(layer("random", (0.5, 0.5)), q, k, v, key_padding([13, 9], 13), RunRows(2))


def test_a_random_draw_does_not_depend_on_how_sentences_are_laid_out_in_rows():
    """Two sentences padded one per row, and packed into one row (a block-diagonal mask, positions that
    restart, TokenPlaces saying where each token comes from): each sentence keeps the same keys."""
    lengths, heads = [3, 5], 2
    q, k, v = qkv(2, heads, length=5, seed=4)
    padded = key_padding(lengths, 5)
    stream = RunStreams([9], "cpu")
    stream.next_step()
    with random_stream(stream):
        alone = probs_of(layer("random", 0.6, layer_index=2), q, k, v, padded) > 0
    tokens = [(0, i) for i in range(3)] + [(1, i) for i in range(5)]
    packed_q, packed_k, packed_v = (torch.stack([t[e, :, i] for e, i in tokens], 1)[None] for t in (q, k, v))
    example = torch.tensor([e for e, _ in tokens])
    block = (example[:, None] == example[None, :])[None, None]
    places = TokenPlaces(example=example[None], position=torch.tensor([i for _, i in tokens])[None])
    stream = RunStreams([9], "cpu")
    stream.next_step()
    with random_stream(stream, places):
        packed = probs_of(layer("random", 0.6, layer_index=2), packed_q, packed_k, packed_v, block) > 0
    assert torch.equal(packed[0, :, :3, :3], alone[0, :, :3, :3])
    assert torch.equal(packed[0, :, 3:, 3:], alone[1, :, :5, :5])


def test_the_stream_hash_is_lowbias32_bit_for_bit():
    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    rng = pyrandom.Random(0)
    values = [0, 1, 0xFFFFFFFF, 0x80000000, *(rng.getrandbits(32) for _ in range(2000))]
    assert hash32(torch.tensor(values)).tolist() == [lowbias32(x) for x in values]


# ---------------------------------------------------------------------------------------------------------- topp


def reference_topp(probs: list[float], p: float) -> set[int]:
    """The smallest set reaching mass p: keys by descending probability, ties by position, until it reaches p."""
    kept, mass = set(), 0.0
    for key in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
        if mass >= p:
            break
        kept.add(key)
        mass += probs[key]
    return kept


@pytest.mark.parametrize("mask_of", [key_padding, causal], ids=["padding", "causal"])
@pytest.mark.parametrize("s", [0.1, 0.5, 0.8])
def test_topp_keeps_the_smallest_set_of_keys_reaching_p(mask_of, s):
    q, k, v = qkv(len(LENGTHS), seed=5)
    mask = mask_of(LENGTHS, 13)
    probs = probs_of(layer("topp", s), q, k, v, mask)
    dense = torch.softmax(masked_scores(q, k, mask), -1)
    sizes = set()
    for b, h, row, _ in query_rows(mask, 2):
        kept = set(torch.nonzero(probs[b, h, row]).flatten().tolist())
        assert kept == reference_topp(dense[b, h, row].tolist(), 1 - s), (b, h, row)
        expected = dense[b, h, row] * (probs[b, h, row] > 0)
        torch.testing.assert_close(probs[b, h, row], expected / expected.sum())
        sizes.add(len(kept))
    assert len(sizes) > 1


def test_topp_breaks_ties_by_key_position():
    scores = torch.tensor([[[[0.0, 2.0, 2.0, 2.0, 0.0, 2.0]]]])  # four tied best keys, each 0.234 of the mass
    k, v = torch.eye(6)[None, None], torch.zeros(1, 1, 6, 6)  # q @ k^T = q: the scores as given

    def kept(s: float) -> list[bool]:
        return (crisp_attention_forward(layer("topp", s), scores, k, v, None, scaling=1.0)[1][0, 0, 0] > 0).tolist()

    assert kept(0.6) == [False, True, True, False, False, False]  # p = 0.4: two of the tied keys reach it
    assert kept(0.3) == [False, True, True, True, False, False]  # p = 0.7: three


def test_topp_at_sparsity_0_of_one_run_in_a_batch_keeps_every_key():
    q, k, v = qkv(4, seed=6)
    mask = key_padding(LENGTHS, 13)
    probs = probs_of(layer("topp", (0.0, 0.9)), q, k, v, mask, RunRows(2))
    torch.testing.assert_close(probs[:2], torch.softmax(masked_scores(q, k, mask)[:2], -1))
    assert (probs[2:] == 0).sum() > (~mask[2:]).expand_as(probs[2:]).sum()


# -------------------------------------------------------------------------------------------------------- entmax


@pytest.mark.parametrize("mask_of", [key_padding, causal], ids=["padding", "causal"])
@pytest.mark.parametrize(("alpha", "library"), [(1.5, entmax_library.entmax15), (2.0, entmax_library.sparsemax),
                                                (1.25, None), (3.0, None)])
def test_entmax_is_the_librarys_on_the_masked_scores(mask_of, alpha, library):
    q, k, v = qkv(len(LENGTHS), seed=7)
    q = q * 2
    mask = mask_of(LENGTHS, 13)
    probs = probs_of(layer("entmax", alpha=alpha), q, k, v, mask)
    scores = masked_scores(q, k, mask)
    expected = library(scores, dim=-1) if library else entmax_library.entmax_bisect(scores, alpha=alpha, dim=-1)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    assert not probs.masked_select(~mask.expand_as(probs)).any()  # zero on padding
    rows = mask.expand_as(probs).any(-1)
    torch.testing.assert_close(probs.sum(-1)[rows], torch.ones(int(rows.sum())), rtol=0, atol=1e-6)
    assert (probs == 0).logical_and(mask).any()  # sparse: zeros a softmax would not give


def test_entmax_gives_each_run_of_a_batch_its_own_alpha():
    q, k, v = qkv(6, seed=8)
    mask = key_padding(LENGTHS[:2] * 3, 13)
    alphas = (1.5, 2.0, 1.5)
    probs = probs_of(layer("entmax", alpha=alphas), q, k, v, mask, RunRows(3))
    for run, alpha in enumerate(alphas):
        rows = slice(2 * run, 2 * run + 2)
        alone = probs_of(layer("entmax", alpha=alpha), q[rows], k[rows], v[rows], mask[rows])
        torch.testing.assert_close(probs[rows], alone, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- every sparsifier


@pytest.mark.parametrize(("name", "parameter"), [("topk", 0.75), ("random", 0.75), ("topp", 0.5), ("entmax", None)])
def test_gradients_flow_only_through_kept_keys(name, parameter):
    q, k, v = qkv(2, seed=9, length=8)
    q = q * 2
    module = layer(name, parameter) if parameter is not None else layer(name, alpha=1.5)
    # an additive float mask is added to the scores: its gradient is the scores' gradient
    per_head = torch.zeros(2, 2, 8, 8, requires_grad=True)
    with random_stream(RunStreams([5], "cpu")):
        out, probs = crisp_attention_forward(module, q, k, v, per_head)
    kept = probs.detach() > 0
    assert 0 < kept.float().mean() < 1
    out.pow(2).sum().backward()
    assert (per_head.grad[~kept] == 0).all()
    shared = kept & (kept.sum(-1, keepdim=True) > 1)  # a key kept alone has probability 1 whatever its score
    assert (per_head.grad[shared] != 0).float().mean() > 0.9


@pytest.mark.parametrize("name", ["random", "topp", "entmax"])
def test_statistics_are_recorded_for_every_sparsifier(name):
    q, k, v = qkv(len(LENGTHS), seed=10)
    mask = key_padding(LENGTHS, 13)
    module = layer(name, 0.8) if name != "entmax" else layer(name, alpha=2.0)
    module.crisp_track_stats = True
    probs = probs_of(module, q, k, v, mask)
    valid_pairs = mask.expand_as(probs) & mask.transpose(-1, -2).expand_as(probs)
    zeros = ((probs == 0) & valid_pairs).sum() / valid_pairs.sum()
    achieved, entropy = module.crisp_stats.tolist()
    assert achieved == pytest.approx(float(zeros)) and achieved > 0.3
    assert 0 < entropy < 1
    if name == "random":  # topk's count of keys: its achieved sparsity
        n = torch.tensor(LENGTHS)
        expected = ((n - kept_keys(n, 0.8)) * n).sum() / (n * n).sum()
        assert achieved == pytest.approx(float(expected))


# ------------------------------------------------------------------------------------------ the model-level API


def test_topk_set_by_name_is_the_default_bit_for_bit():
    model, named = tiny_model("bert"), tiny_model("bert")
    ids, mask = padded_batch([9, 5, 12])
    for m in (model, named):
        crisp.set_sparsity(m, 0.7)
    assert crisp.set_sparsifier(named, "topk") == {}
    torch.testing.assert_close(named(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def peaked_model(arch: str) -> nn.Module:
    """A tiny random-init model whose attention is peaked (random init's is nearly uniform)."""
    model = tiny_model(arch)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.3)
    return model


def test_a_sparsifier_brings_its_default_apply_in_eval_and_configure_changes_it(arch):
    model, dense_model = tiny_model(arch), tiny_model(arch)
    crisp.set_sparsity(dense_model, 0.0)  # crisp's attention in every layer (MPNet's through its adapter)
    ids, mask = padded_batch([6, 11, 3])
    dense = dense_model(input_ids=ids, attention_mask=mask).logits
    crisp.set_sparsity(model, 0.8)
    crisp.set_sparsifier(model, "random")  # training only, like dropout
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, dense, rtol=0, atol=0)
    model.train()
    with random_stream(RunStreams([1], "cpu")):
        model(input_ids=ids, attention_mask=mask)
    assert all(s.achieved_sparsity > 0.5 for s in crisp.attention_stats(model))
    model.eval()
    crisp.configure(model, sparsifier="random", apply_in_eval=True)
    with random_stream(RunStreams([1], "cpu")):
        assert (model(input_ids=ids, attention_mask=mask).logits - dense).abs().max() > 1e-4


def test_entmax_through_configure_is_sparse_in_every_layer(arch):
    model = peaked_model(arch)
    ids, mask = padded_batch([12, 7])
    crisp.configure(model, sparsifier="entmax", alpha=2.0)
    model(input_ids=ids, attention_mask=mask)
    assert all(s.achieved_sparsity > 0 for s in crisp.attention_stats(model))


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: crisp.set_sparsifier(m, "bogus"), r"sparsifier='bogus' is not allowed: choose one of \['entmax'"),
    (lambda m: crisp.set_sparsifier(m, "topk", alpha=2.0), r"sparsifier.alpha=2.0 is not allowed: sparsifier topk"),
    (lambda m: crisp.set_sparsifier(m, "entmax", alpha=1.0), r"sparsifier.alpha=1.0 is not allowed: .*> 1"),
    (lambda m: crisp.configure(m, alpha=2.0), r"alpha: a sparsifier's own keys come with it"),
])
def test_the_api_refuses_unknown_sparsifiers_and_keys_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_model("distilbert"))


@pytest.fixture
def registered():
    """Sparsifiers a test registers leave the registry with it."""
    before = dict(registry.SPARSIFIERS)
    yield
    registry.SPARSIFIERS.clear()
    registry.SPARSIFIERS.update(before)


def test_a_sparsifier_of_ones_own_works_through_configure(registered):
    """One registered function: a tempered softmax with a key of its own; at temperature 1 it is dense attention."""
    calls = []

    @crisp.register_sparsifier("tempered", uses_sparsity=False, parameter="temperature", keys={"temperature": 1.0})
    def tempered(scores, valid, temperature, call):
        calls.append((call.runs, call.layer, dict(call.params)))
        return torch.softmax(scores / temperature, dim=-1)

    model, dense_model = peaked_model("bert"), peaked_model("bert")
    ids, mask = padded_batch([10, 4])
    dense = dense_model(input_ids=ids, attention_mask=mask).logits
    crisp.configure(model, sparsifier="tempered")
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, dense, rtol=0, atol=1e-6)
    assert calls == [(1, i, {"temperature": 1.0}) for i in range(3)]
    crisp.configure(model, sparsifier="tempered", temperature=0.25)
    sharper = model(input_ids=ids, attention_mask=mask).logits
    assert (sharper - dense).abs().max() > 1e-3
    dense_model(input_ids=ids, attention_mask=mask)
    for tempered, plain in zip(crisp.attention_stats(model), crisp.attention_stats(dense_model), strict=True):
        assert tempered.entropy < plain.entropy


def test_a_sparsifier_of_ones_own_is_found_through_the_module_its_yaml_names(registered, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from crisp.core.config import ConfigError, register_configs, register_resolvers, validate
    from tests.conftest import ROOT

    (tmp_path / "my_sparsifier.py").write_text(textwrap.dedent("""
        import torch
        import crisp

        @crisp.register_sparsifier("first_key", keys={"width": 1.0})
        def first_key(scores, valid, sparsity, call):
            return torch.softmax(scores, dim=-1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["sparsity=0.5"])
    OmegaConf.update(cfg, "sparsifier", {"name": "first_key", "module": "my_sparsifier", "width": 2.0,
                                         "apply_in_eval": True, "stats_every_n_steps": 50}, merge=False)
    validate(cfg)
    assert cfg.name == "first_key_uniform_s0.5_seed1"
    OmegaConf.update(cfg, "sparsifier.module", "no_such_module")
    del registry.SPARSIFIERS["first_key"]
    with pytest.raises(ConfigError, match="sparsifier.module='no_such_module' is not allowed"):
        validate(cfg)


def test_the_registry_and_the_config_checks_load_without_torch():
    """crisp.core.config answers a bad config within a second: the sparsifiers' metadata must not need torch."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys, crisp.core.config, crisp.sparsity.registry as r; "
            "assert sorted(r.SPARSIFIERS) == ['entmax', 'random', 'topk', 'topp']; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch loaded'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_grid_over_topk_and_random_trains_dense_once_per_seed_and_reports_both_against_it(tmp_path):
    from crisp.core import results
    from tests.conftest import run_crisp

    proc = run_crisp("-m", "experiment=smoke", "sparsifier=topk,random", "sparsity=0,0.8", "seed=1,2",
                     "data.num_train=256", "data.num_val=128", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {p.parent.name: results.read(p) for p in results.find_all(tmp_path)}
    assert sorted(found) == ["dense_seed1", "dense_seed2", "random_uniform_s0.8_seed1", "random_uniform_s0.8_seed2",
                             "uniform_s0.8_seed1", "uniform_s0.8_seed2"]
    assert all(r["status"] == "completed" for r in found.values())
    assert found["random_uniform_s0.8_seed1"]["sparsifier"] == "random"
    report = (tmp_path / "report.md").read_text()
    for row in ("| – | dense | 0 | 2 |", "| topk | uniform | 0.8 | 2 |", "| random | uniform | 0.8 | 2 |"):
        assert row in report, report
    # both sparsifiers paired against the one dense row, over both seeds
    assert report.count(" | 2 | – | 0 |") == 2
