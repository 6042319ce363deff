"""DeBERTa-v2 and -v3 (``deberta-v2``: microsoft/deberta-v3-base): an adapter for its inline disentangled attention.

``DisentangledSelfAttention.forward`` computes its scores and softmax itself and never calls transformers'
attention registry. The adapter replaces that one method on each instance, not the modeling file: the same
projections and the same scores as DeBERTa computes them, the content term ``q k^T`` and the position terms
(content-to-position, position-to-content) each divided by ``sqrt(head size * number of terms)``, summed; then
crisp's attention function takes the sum, the content term as its ``q k^T`` times ``scaling`` and the position
terms as part of an additive mask (as MPNet's adapter hands it its relative bias), so the exact-k semantics,
the statistics and the fused kernel are BERT's. DeBERTa masks padded queries as well as padded keys: a padded
query row sees no key, and its own token is left out of the statistics.

In a model fused for lockstep (:mod:`crisp.lockstep.fused`) the relative position embeddings and their LayerNorm
hold one table per run (``[runs, 2 * span, hidden]``): :func:`position_terms` projects each run's table with that
run's projections and gives each run's block of rows its own terms, as MPNet's adapter gives each run its own
relative bias (:func:`crisp.sparsity.families.mpnet.position_bias`). Relative positions are translation-invariant,
so packed rows need nothing more. Packed rows come with a block mask (``[rows, 1, length, length]``) where
DeBERTa's embeddings expect the padding mask, which they multiply in; a padded token's embedding reaches no real
token's output (it is never a key), so the embeddings leave a block mask out (:func:`embeddings_forward`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.deberta_v2.modeling_deberta_v2 import (
    DebertaV2Embeddings,
    DisentangledSelfAttention,
    build_relative_position,
    build_rpos,
    scaled_size_sqrt,
)

from crisp.sparsity import visibility
from crisp.sparsity.attention import crisp_attention_forward
from crisp.sparsity.families import Family, patching, register


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
        bias = position_terms(self, query_layer, key_layer, relative_pos, self.pos_dropout(rel_embeddings), terms)
        mask = visibility.with_position_bias(mask, bias.view(-1, heads, *bias.shape[-2:]))

    def per_head(x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, heads, *x.shape[-2:])

    out, probs = crisp_attention_forward(self, per_head(query_layer), per_head(key_layer), per_head(value_layer),
                                         mask, scaling=1.0 / float(scale),
                                         dropout=self.dropout.p if self.training else 0.0)
    out = out.reshape(*out.shape[:2], -1)
    return out, (probs if output_attentions else None)


def position_terms(self: DisentangledSelfAttention, query_layer, key_layer, relative_pos, rel_embeddings,
                   terms: int) -> torch.Tensor:
    """DeBERTa's ``disentangled_attention_bias`` (content-to-position and position-to-content, ``[batch * heads,
    queries, keys]``), also for a fused table of one relative embedding table per run (see the module)."""
    if relative_pos is None:
        relative_pos = build_relative_position(query_layer, key_layer, bucket_size=self.position_buckets,
                                               max_position=self.max_relative_positions)
    if relative_pos.dim() == 2:
        relative_pos = relative_pos.unsqueeze(0).unsqueeze(0)
    elif relative_pos.dim() == 3:
        relative_pos = relative_pos.unsqueeze(1)
    relative_pos = relative_pos.to(device=query_layer.device, dtype=torch.long)
    span, heads = self.pos_ebd_size, self.num_attention_heads
    table = rel_embeddings if rel_embeddings.dim() == 3 else rel_embeddings.unsqueeze(0)  # [runs, 2 span, hidden]
    table = table[:, : span * 2]
    runs, per_run = table.size(0), query_layer.size(0) // heads // table.size(0)

    def per_row(projection: nn.Module) -> torch.Tensor:
        """Each run's projected table, heads split, repeated for each of the run's rows: [batch * heads, 2 span, d]."""
        x = projection(table)
        x = x.view(runs, x.size(1), heads, -1).transpose(1, 2)  # [runs, heads, 2 span, d]
        return x.unsqueeze(1).expand(-1, per_run, -1, -1, -1).reshape(-1, *x.shape[-2:])

    score = 0
    if "c2p" in self.pos_att_type:
        pos_key_layer = per_row(self.key_proj if self.share_att_key else self.pos_key_proj)
        scale = scaled_size_sqrt(pos_key_layer, terms)
        c2p_att = torch.bmm(query_layer, pos_key_layer.transpose(-1, -2))
        c2p_pos = torch.clamp(relative_pos + span, 0, span * 2 - 1)
        index = c2p_pos.squeeze(0).expand([query_layer.size(0), query_layer.size(1), relative_pos.size(-1)])
        score += torch.gather(c2p_att, dim=-1, index=index) / scale.to(dtype=c2p_att.dtype)
    if "p2c" in self.pos_att_type:
        pos_query_layer = per_row(self.query_proj if self.share_att_key else self.pos_query_proj)
        scale = scaled_size_sqrt(pos_query_layer, terms)
        r_pos = build_rpos(query_layer, key_layer, relative_pos, self.max_relative_positions, self.position_buckets)
        p2c_pos = torch.clamp(-r_pos + span, 0, span * 2 - 1)
        p2c_att = torch.bmm(key_layer, pos_query_layer.transpose(-1, -2))
        index = p2c_pos.squeeze(0).expand([query_layer.size(0), key_layer.size(-2), key_layer.size(-2)])
        score += torch.gather(p2c_att, dim=-1, index=index).transpose(-1, -2) / scale.to(dtype=p2c_att.dtype)
    return score


def embeddings_forward(self: DebertaV2Embeddings, input_ids=None, token_type_ids=None, position_ids=None, mask=None,
                       inputs_embeds=None):
    """DeBERTa's embeddings; a packed batch's block mask (4-D) is not multiplied in (see the module)."""
    mask = None if mask is not None and mask.dim() == 4 else mask
    return DebertaV2Embeddings.forward(self, input_ids, token_type_ids, position_ids, mask, inputs_embeds)


install = patching((DisentangledSelfAttention, "forward", attention_forward),
                   (DebertaV2Embeddings, "forward", embeddings_forward))


register(Family(
    "deberta-v2", ("deberta-v2",),
    token_types=True,
    attention_modules=lambda model: [m for m in model.modules() if isinstance(m, DisentangledSelfAttention)],
    install=install,
    # its pooler and classifier drop with their own keys (pooler_dropout, cls_dropout) or hidden_dropout_prob
    dropout={"hidden": "hidden_dropout_prob", "attention": "attention_probs_dropout_prob"},
    projections=("query_proj", "key_proj", "value_proj"),
))
