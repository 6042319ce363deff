"""DeBERTa-v2 and -v3 (``deberta-v2``: microsoft/deberta-v3-base): an adapter for its inline disentangled attention.

``DisentangledSelfAttention.forward`` computes its scores and softmax itself and never calls transformers'
attention registry. The adapter replaces that one method on each instance, not the modeling file: the same
projections and the same scores as DeBERTa computes them, the content term ``q k^T`` and the position terms
(content-to-position, position-to-content) each divided by ``sqrt(head size * number of terms)``, summed; then
crisp's attention function takes the sum, the content term as its ``q k^T`` times ``scaling`` and the position
terms as part of an additive mask (as MPNet's adapter hands it its relative bias), so the exact-k semantics,
the statistics and the fused kernel are BERT's. DeBERTa masks padded queries as well as padded keys: a padded
query row sees no key, and its own token is left out of the statistics.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention, scaled_size_sqrt

from crisp.sparsity import visibility
from crisp.sparsity.attention import crisp_attention_forward
from crisp.sparsity.families import Family


def attention_forward(self: DisentangledSelfAttention, hidden_states, attention_mask, output_attentions=False,
                      query_states=None, relative_pos=None, rel_embeddings=None):
    query_states = hidden_states if query_states is None else query_states
    heads = self.num_attention_heads
    query_layer = self.transpose_for_scores(self.query_proj(query_states), heads)  # [batch * heads, length, size]
    key_layer = self.transpose_for_scores(self.key_proj(hidden_states), heads)
    value_layer = self.transpose_for_scores(self.value_proj(hidden_states), heads)
    terms = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
    scale = scaled_size_sqrt(query_layer, terms)  # DeBERTa's sqrt(head size * terms), as a tensor
    mask = attention_mask.bool()
    if self.relative_attention:
        bias = self.disentangled_attention_bias(query_layer, key_layer, relative_pos,
                                                self.pos_dropout(rel_embeddings), terms)
        mask = visibility.with_position_bias(mask, bias.view(-1, heads, *bias.shape[-2:]))

    def per_head(x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, heads, *x.shape[-2:])

    out, probs = crisp_attention_forward(self, per_head(query_layer), per_head(key_layer), per_head(value_layer),
                                         mask, scaling=1.0 / float(scale),
                                         dropout=self.dropout.p if self.training else 0.0)
    out = out.reshape(*out.shape[:2], -1)
    return out, (probs if output_attentions else None)


def install(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, DisentangledSelfAttention):
            module.forward = types.MethodType(attention_forward, module)


FAMILY = Family(
    "deberta-v2", ("deberta-v2",),
    token_types=True,
    attention_modules=lambda model: [m for m in model.modules() if isinstance(m, DisentangledSelfAttention)],
    install=install,
    lockstep=False,  # its adapter is checked for one run; fusing runs of it is not (crisp.lockstep)
    # its pooler and classifier drop with their own keys (pooler_dropout, cls_dropout) or hidden_dropout_prob
    dropout={"hidden": "hidden_dropout_prob", "attention": "attention_probs_dropout_prob"},
)
