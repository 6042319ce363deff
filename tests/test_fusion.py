"""Which models lockstep fuses: the encoders it promises are admitted by :func:`crisp.lockstep.fusable.why_not_fused`
and, fused with another run and fed packed sentences, compute what each run computes alone; others are refused
with the reason.

A family of no module of its own (RoBERTa, XLM-R, CamemBERT, ELECTRA, ERNIE, Data2Vec-text, ...) fuses with what
:func:`crisp.sparsity.families.derived` reads off the model; DeBERTa-v2 fuses through its adapter, its relative
position table one per run. Every other sequence classifier of the installed transformers is checked the same way
by ``tests/test_coverage.py`` (docs/encoders.md's lockstep column).
"""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoModelForSequenceClassification

from crisp.lockstep.fusable import why_not_fused
from crisp.sparsity.families import family_of
from tests.encoder_coverage import assert_fused_equals_alone, tiny_config

# the encoders lockstep fuses without a module of their own, and the families that have one
FUSED = ("roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text", "bert", "distilbert", "mpnet",
         "deberta-v2")


@pytest.mark.parametrize("model_type", FUSED)
def test_each_encoder_lockstep_promises_fuses_and_computes_each_runs_own_logits(model_type):
    config = tiny_config(model_type)
    assert why_not_fused(config) is None
    assert_fused_equals_alone(config)


DEBERTA = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
           "max_position_embeddings": 64, "vocab_size": 99, "num_labels": 3, "hidden_dropout_prob": 0.0,
           "attention_probs_dropout_prob": 0.0, "relative_attention": True, "norm_rel_ebd": "layer_norm"}


@pytest.mark.parametrize("settings", [
    {"pos_att_type": ["p2c", "c2p"], "share_att_key": True, "position_buckets": 8, "position_biased_input": False},
    {"pos_att_type": ["c2p"], "share_att_key": False, "position_buckets": -1, "max_relative_positions": 16,
     "position_biased_input": True, "type_vocab_size": 2},
    {"pos_att_type": ["p2c"], "share_att_key": False, "position_buckets": 4, "position_biased_input": False},
], ids=["v3", "v2-c2p-absolute-typed", "p2c"])
def test_deberta_v2_fuses_with_one_relative_position_table_per_run(settings):
    """Content-to-position and position-to-content terms from each run's own table and projections (shared with
    the content's or their own), absolute positions and token types where the config has them."""
    config = AutoConfig.for_model("deberta-v2", **DEBERTA, **settings)
    assert why_not_fused(config) is None
    assert_fused_equals_alone(config)


def test_a_roberta_style_family_is_read_off_the_model():
    """RoBERTa has no family module: its first position follows the padding id, its projections and dropout
    keys are BERT's names, and its token types count when its config has more than one."""
    model = AutoModelForSequenceClassification.from_config(tiny_config("roberta"), attn_implementation="crisp")
    family = family_of(model)
    assert family.first_position(model) == model.config.pad_token_id + 1
    assert family.projections == ("query", "key", "value")
    assert family.dropout == {"hidden": "hidden_dropout_prob", "attention": "attention_probs_dropout_prob",
                              "classifier": "classifier_dropout"}
    assert family.token_types == (model.config.type_vocab_size > 1)


@pytest.mark.parametrize(("model_type", "reason"), [
    ("gpt_neo", "causal: its classifier reads each sentence's last token"),
    ("llama", "causal: its classifier reads each sentence's last token"),
    ("bart", "an encoder-decoder"),
    ("albert", "gives logits of shape (6, 1, 3), not (6, 3)"),
    ("modernbert", "parameters in LayerNorm without bias"),
    ("esm", "a fused forward of packed sentences fails"),
])
def test_a_model_lockstep_cannot_fuse_is_refused_with_the_reason(model_type, reason):
    assert reason in (why_not_fused(tiny_config(model_type)) or "")
