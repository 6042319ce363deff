"""MPNet (``mpnet``: all-mpnet-base-v2): an adapter that routes its inline attention through crisp's function.

``MPNetSelfAttention.forward`` computes its scores and softmax itself, with a relative position bias,
and never calls transformers' attention registry: loaded with ``attn_implementation="crisp"`` it would
train dense (and add crisp's boolean mask as if it were additive). The adapter replaces that one
method on each instance, not the modeling file: the same projections, then crisp's attention function
on the scores after the relative position bias (given to it as part of the additive mask, so the
exact-k semantics, the statistics and the fused kernel are BERT's), then the output projection.

The encoder's position bias is recomputed by :func:`position_bias`, the stock arithmetic with one
addition: a relative-bias table fused for lockstep holds one table per run (``[runs, buckets,
heads]``), and each run's block of rows gets its own. Relative positions are translation-invariant,
so packed rows need nothing more: two tokens of one sentence are as far apart as alone, and tokens of
different sentences never see each other. Absolute positions start after the embeddings' padding id
(``padding_idx + 1``), as ``create_position_ids_from_input_ids`` numbers them.
"""

from __future__ import annotations

import torch
from transformers.models.mpnet.modeling_mpnet import MPNetEmbeddings, MPNetEncoder, MPNetSelfAttention

from crisp.sparsity.attention import crisp_attention_forward
from crisp.sparsity.families import Family, patching, register

# The last forward's additive mask: every layer of a forward gets the same mask and position bias
# objects from the encoder, so the mask is made once per forward, not once per layer (as crisp.sparsity.topk
# keeps the last mask's derived tensors); another mask or bias object simply replaces it.
_LAST: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []


def _with_position_bias(attention_mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """One additive mask: the relative position bias on attended keys, the dtype's minimum elsewhere."""
    if _LAST and _LAST[0][0] is attention_mask and _LAST[0][1] is bias:
        return _LAST[0][2]
    if attention_mask is None:
        combined = bias
    elif attention_mask.dtype == torch.bool:
        combined = bias.masked_fill(~attention_mask, torch.finfo(bias.dtype).min)
    else:
        combined = bias + attention_mask
    _LAST[:] = [(attention_mask, bias, combined)]
    return combined


def attention_forward(self: MPNetSelfAttention, hidden_states, attention_mask=None, position_bias=None,
                      output_attentions=False, **kwargs):
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    query, key, value = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q, self.k, self.v))
    mask = attention_mask if position_bias is None else _with_position_bias(attention_mask, position_bias)
    out, probs = crisp_attention_forward(self, query, key, value, mask, scaling=self.attention_head_size ** -0.5,
                                         dropout=self.dropout.p if self.training else 0.0)
    out = self.o(out.reshape(*hidden_states.shape[:-1], -1))
    return (out, probs) if output_attentions else (out,)


def position_bias(self: MPNetEncoder, x: torch.Tensor, position_ids=None, num_buckets: int = 32) -> torch.Tensor:
    """``[rows, heads, length, length]``: the bias of each key's position relative to each query's."""
    positions = torch.arange(x.size(1), device=x.device)
    bucket = self.relative_position_bucket(positions[None, :] - positions[:, None], num_buckets=num_buckets)
    values = self.relative_attention_bias.weight[..., bucket, :].movedim(-1, -3)  # [(runs,) heads, L, L]
    if values.dim() == 3:
        return values.unsqueeze(0).expand(x.size(0), -1, -1, -1).contiguous()
    return values.repeat_interleave(x.size(0) // values.size(0), dim=0)  # one block of rows per run


install = patching((MPNetSelfAttention, "forward", attention_forward),
                   (MPNetEncoder, "compute_position_bias", position_bias))


register(Family(
    "mpnet", ("mpnet",),
    first_position=lambda model: next(m for m in model.modules() if isinstance(m, MPNetEmbeddings)).padding_idx + 1,
    attention_modules=lambda model: [m for m in model.modules() if isinstance(m, MPNetSelfAttention)],
    install=install,
    # its classification head drops with hidden_dropout_prob: no key of its own
    dropout={"hidden": "hidden_dropout_prob", "attention": "attention_probs_dropout_prob"},
    projections=("q", "k", "v"),
))
