"""Encoder families: MPNet's adapter gives exactly stock MPNet at s=0 and exact top-k at s>0; an encoder
whose attention crisp cannot reach fails before it trains, instead of training dense."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch
from transformers import AutoModelForSequenceClassification, MPNetConfig

import crisp
from crisp.sparsity.families import AttentionNotReached, attention_modules, family_of
from crisp.sparsity.topk import kept_keys
from tests.conftest import ROOT, VOCAB, tiny_model


def tiny_mpnet(attn: str = "crisp", seed: int = 0):
    torch.manual_seed(seed)
    config = MPNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=130, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn).eval()


def padded_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 11), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate((11, 7, 4, 9)):
        mask[row, length:] = 0
        ids[row, length:] = 1  # MPNet's padding id
    return ids, mask


def test_mpnet_at_sparsity_0_gives_stock_mpnets_logits():
    ids, mask = padded_batch()
    sparse = tiny_mpnet()
    crisp.prepare(sparse)
    expected = tiny_mpnet("eager")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(sparse(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-6)
    assert family_of(sparse).name == "mpnet" and len(attention_modules(sparse)) == 3


@pytest.mark.parametrize("sparsity", [0.3, 0.8])
def test_mpnet_keeps_exactly_k_keys_per_row_and_never_padding(sparsity):
    ids, mask = padded_batch(1)
    model = tiny_mpnet()
    crisp.set_sparsity(model, sparsity)
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 3
    lengths = mask.sum(1)
    for probs in out.attentions:  # [batch, heads, query, key]
        kept = probs > 0
        for row, n in enumerate(lengths.tolist()):
            k = kept_keys(n, sparsity)
            assert (kept[row, :, :n, :n].sum(-1) == k).all()  # every valid query row keeps exactly k keys
            assert not kept[row, :, :n, n:].any()  # padding is never kept
    stats = crisp.attention_stats(model)
    assert all(abs(s.achieved_sparsity - sparsity) < 0.15 for s in stats)


def test_an_encoder_whose_attention_bypasses_the_registry_fails_before_training():
    model = tiny_model("bert")
    for module in attention_modules(model):  # attention computed inline, as some modeling files do it
        def inline(self, hidden_states, attention_mask=None, **kwargs):
            shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
            q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
            probs = torch.softmax(q @ k.transpose(-1, -2) * self.scaling, dim=-1)
            return (probs @ v).transpose(1, 2).reshape(*hidden_states.shape[:-1], -1), probs

        module.forward = types.MethodType(inline, module)
    with pytest.raises(AttentionNotReached) as err:
        crisp.prepare(model)
    message = str(err.value)
    assert "BertForSequenceClassification" in message and "layers [0, 1, 2] of 3 bypass it" in message
    assert "bert, deberta-v2, distilbert, gpt_neo, mpnet" in message and "train dense" in message


def test_stock_encoders_reach_crisps_attention_in_every_layer(arch):
    crisp.prepare(tiny_model(arch))  # no error: BERT and DistilBERT dispatch through the registry


@pytest.mark.parametrize(("share_att_key", "buckets"), [(True, 8), (False, -1)])  # DeBERTa-v3's and v2's
def test_deberta_v2_keeps_its_position_terms_exact_at_sparsity_0_and_exact_k_above(share_att_key, buckets):
    from transformers import DebertaV2Config

    from tests.encoder_coverage import VOCAB as BATCH_VOCAB
    from tests.encoder_coverage import assert_exact_topk, assert_same

    def config():
        return DebertaV2Config(vocab_size=BATCH_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                               pos_att_type=["p2c", "c2p"], position_buckets=buckets, max_relative_positions=-1,
                               share_att_key=share_att_key, position_biased_input=False, norm_rel_ebd="layer_norm",
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1)

    torch.manual_seed(0)
    eager = AutoModelForSequenceClassification.from_config(config(), attn_implementation="eager").eval()
    model = AutoModelForSequenceClassification.from_config(config(), attn_implementation="crisp").eval()
    model.load_state_dict(eager.state_dict())
    crisp.prepare(model)
    assert family_of(model).name == "deberta-v2"
    assert_same(model, eager, "DeBERTa-v2 at sparsity 0")  # logits and hidden states within 1e-5, padded or not
    assert_exact_topk(model, eager)  # k of each row's n keys at 0.8; a padded query row sees no key


@pytest.mark.parametrize("first", ["crisp", "gpt_neo"])
def test_gpt_neo_builds_with_crisp_attention_whichever_is_imported_first(first):
    """GPT-Neo looks its attention class up in its own table: crisp adds itself there as GPT-Neo's modeling file
    loads (or at once, if it loaded first); before, it failed with KeyError: 'crisp'."""
    imports = ["import crisp", "import transformers.models.gpt_neo.modeling_gpt_neo"]
    code = "; ".join([*(imports if first == "crisp" else imports[::-1]), (
        "from transformers import AutoModelForSequenceClassification, GPTNeoConfig; "
        "c = GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[['global', "
        "'local'], 1]], window_size=4, max_position_embeddings=32, pad_token_id=0); "
        "m = AutoModelForSequenceClassification.from_config(c, attn_implementation='crisp'); crisp.prepare(m); "
        "print(crisp.set_sparsity(m, 0.5))")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[0.5, 0.5]"
