"""Which keys each query row may see (crisp.sparsity.visibility): causal rows stay causal with a mask or without
one, a row's n counts only the keys it may see, grouped key/value heads are shared as eager shares them, a row
that may see no key stays finite, and a model crisp has not reached gets the mask its own code expects."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AlbertConfig, AutoModelForSequenceClassification, LlamaConfig, ModernBertConfig

import crisp
from crisp.sparsity import families, visibility
from crisp.sparsity.attention import crisp_attention_forward
from crisp.sparsity.topk import kept_keys, valid_key_mask
from tests.conftest import ROOT
from tests.encoder_coverage import batch, build


def attention(sparsity: float = 0.0, **attributes) -> nn.Module:
    """An attention module as crisp's function sees it: its settings and what the model says of it."""
    module = nn.Module().eval()
    module.crisp_sparsity = sparsity
    for name, value in attributes.items():
        setattr(module, name, value)
    return module


def qkv(heads: int = 4, kv_heads: int = 4, length: int = 7, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, 8, generator=generator)
    return q, torch.randn(2, kv_heads, length, 8, generator=generator), torch.randn(2, kv_heads, length, 8,
                                                                                    generator=generator)


def test_with_no_mask_a_causal_module_is_causal_as_sdpa_makes_it():
    q, k, v = qkv()
    out, probs = crisp_attention_forward(attention(is_causal=True), q, k, v, None, scaling=8**-0.5)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=8**-0.5)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
    later = torch.ones(7, 7, dtype=torch.bool).triu(1)  # key after query
    assert not probs[..., later].any()
    # the call's keyword wins over the module's attribute (as in sdpa); a module that says nothing is not causal
    _, bidirectional = crisp_attention_forward(attention(is_causal=True), q, k, v, None, is_causal=False)
    assert bidirectional[..., later].gt(0).all()
    _, unsaid = crisp_attention_forward(attention(), q, k, v, None)
    assert unsaid[..., later].gt(0).all()


def test_a_causal_rows_n_is_its_prefix_for_k_and_for_the_statistics():
    q, k, v = qkv(length=10)
    module = attention(0.8, is_causal=True)
    _, probs = crisp_attention_forward(module, q, k, v, None, scaling=8**-0.5)
    n = torch.arange(1, 11)
    assert torch.equal((probs > 0).sum(-1), kept_keys(n, 0.8).expand(2, 4, 10))
    achieved, _ = module.crisp_stats.tolist()
    assert achieved == pytest.approx(float((n - kept_keys(n, 0.8)).sum() / n.sum()))
    # the entropy the adaptive strategy calibrates on: each row's over log of its own n (rows of n > 1)
    module.crisp_sparsity = 0.0
    _, probs = crisp_attention_forward(module, q, k, v, None, scaling=8**-0.5)
    normalized = -torch.special.xlogy(probs, probs).sum(-1)[..., 1:] / n[1:].log()
    assert module.crisp_stats[1].item() == pytest.approx(normalized.mean().item(), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral"])
@pytest.mark.parametrize("padded", [False, True])
def test_a_later_token_never_moves_an_earlier_position_of_a_sparse_causal_model(arch, padded):
    model, eager = build(arch)
    crisp.prepare(model)
    crisp.set_sparsity(model, 0.5)
    ids, mask = batch(padded)
    changed = ids.clone()
    changed[0, 9] = 5 if ids[0, 9] != 5 else 6  # the first sentence's last token
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        after = model(input_ids=changed, attention_mask=mask, output_hidden_states=True).hidden_states
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.equal(before[-1][0, 9], after[-1][0, 9])


def test_grouped_key_value_heads_are_shared_as_eager_shares_them():
    q, k, v = qkv(heads=4, kv_heads=2)
    module = attention(num_key_value_groups=2)
    out, probs = crisp_attention_forward(module, q, k, v, None, scaling=8**-0.5)
    shared_k, shared_v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # heads 0, 1 read kv head 0
    expected = torch.softmax(q @ shared_k.transpose(-1, -2) * 8**-0.5, -1)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(out, (expected @ shared_v).transpose(1, 2))
    module.crisp_sparsity = 0.5
    _, probs = crisp_attention_forward(module, q, k, v, None, scaling=8**-0.5)
    assert ((probs > 0).sum(-1) == kept_keys(7, 0.5)).all()
    with pytest.raises(ValueError, match="4 query heads cannot share 3 key/value heads"):
        crisp_attention_forward(module, q, *qkv(heads=3, kv_heads=3)[1:], None)


def tiny_modernbert() -> nn.Module:
    config = ModernBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64, local_attention=4,
                              global_attn_every_n_layers=2, pad_token_id=0, cls_token_id=1, sep_token_id=2,
                              bos_token_id=1, eos_token_id=2, num_labels=2)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="crisp")


def test_a_padding_row_outside_every_local_window_stays_finite_and_so_do_the_gradients():
    """ModernBERT's NaN loss at sparsity 0.8: a padding token two windows past its sentence's end may see no key;
    keeping none of them gave its row 0/0, and the backward pass (0 * NaN) carried NaN into every weight."""
    model = tiny_modernbert()
    crisp.prepare(model)
    crisp.set_sparsity(model, 0.8)
    ids = torch.randint(3, 64, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 4:], ids[1, 4:] = 0, 0
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_an_additive_mask_of_minus_ten_thousand_removes_a_key_and_a_position_bias_does_not():
    """Older modeling code masks with -10000 (MarkupLM); n counts the keys a row may see, not the padding."""
    assert valid_key_mask(torch.tensor([0.0, -10000.0, -3.5, torch.finfo(torch.float32).min])).tolist() == \
        [True, False, True, False]


def test_crisp_gives_a_model_it_has_not_reached_eagers_additive_mask_and_then_its_boolean_causal_mask(monkeypatch):
    monkeypatch.setattr(visibility, "_REACHED", set())
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0)
    kwargs = {"batch_size": 1, "q_length": 4, "kv_length": 4, "attention_mask": torch.ones(1, 4, dtype=torch.bool),
              "allow_is_causal_skip": True, "dtype": torch.float32, "config": config}
    additive = visibility.mask_for(**kwargs)
    assert additive.dtype == torch.float32 and torch.equal(additive == 0, torch.ones(4, 4).tril().bool()[None, None])
    torch.manual_seed(0)
    crisp.prepare(AutoModelForSequenceClassification.from_config(config, attn_implementation="crisp"))
    boolean = visibility.mask_for(**kwargs)  # sdpa would leave this unpadded causal mask to is_causal (None)
    assert boolean.dtype == torch.bool and torch.equal(boolean, torch.ones(4, 4).tril().bool()[None, None])


def test_attention_not_reached_is_one_user_error_that_loads_without_torch():
    code = ("import sys; from crisp.sparsity.errors import AttentionNotReached; from crisp.core.errors import "
            "USER_ERRORS; assert AttentionNotReached in USER_ERRORS; assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    assert crisp.AttentionNotReached is families.AttentionNotReached


def test_a_model_with_no_attention_crisp_can_reach_is_refused_with_attention_not_reached():
    model, _ = build("fnet")  # Fourier transforms instead of attention
    for call in (crisp.prepare, lambda m: crisp.set_sparsity(m, 0.5)):
        with pytest.raises(crisp.AttentionNotReached, match=r"FNetForSequenceClassification \(no attention layer"):
            call(model)


def test_albert_says_its_layers_share_one_attention_module():
    config = AlbertConfig(vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=64)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="crisp")
    with pytest.raises(ValueError, match="AlbertForSequenceClassification's 4 layers share 1 attention module"):
        crisp.set_sparsity(model, [0.5] * 4)
    assert crisp.set_sparsity(model, [0.5]) == [0.5]
