"""GPT-Neo (``gpt_neo``): an adapter for its inline causal attention, global and local layers.

GPT-Neo picks its attention class by implementation name from its own table (``eager``,
``flash_attention_2``), not from transformers' attention registry: asked for ``attn_implementation="crisp"`` it
failed with ``KeyError: 'crisp'`` before crisp could see it. Importing this module (crisp does it as soon as
GPT-Neo's modeling file loads) adds ``"crisp"`` to that table as the eager class, so the model builds, and the
adapter replaces its ``_attn`` on each instance: the same scores (GPT-Neo does not scale them), the keys a row
may see from GPT-Neo's own causal buffer (a local layer's is a window of ``window_size`` keys) and the padding
mask, then crisp's attention function. Stock GPT-Neo casts query and key to fp32 for its scores; the adapter
keeps their dtype (under autocast, bf16 scores), as crisp's function does for every other family.
"""

from __future__ import annotations

import torch
from transformers.models.gpt_neo.modeling_gpt_neo import GPT_NEO_ATTENTION_CLASSES, GPTNeoSelfAttention

from crisp.sparsity.attention import NAME, crisp_attention_forward
from crisp.sparsity.families import Family, patching, register

GPT_NEO_ATTENTION_CLASSES.setdefault(NAME, GPTNeoSelfAttention)


def _attn(self: GPTNeoSelfAttention, query, key, value, attention_mask=None):
    queries, keys = query.size(-2), key.size(-2)
    window = self.bias[:, :, keys - queries:keys, :keys]  # causal, and local where the layer is local
    if attention_mask is None:
        mask = window
    elif attention_mask.dtype == torch.bool:
        mask = attention_mask & window
    else:
        mask = attention_mask.masked_fill(~window, torch.finfo(attention_mask.dtype).min)
    out, probs = crisp_attention_forward(self, query, key, value, mask, scaling=1.0,
                                         dropout=self.attn_dropout.p if self.training else 0.0)
    return out.transpose(1, 2), probs  # GPT-Neo merges heads from [batch, heads, length, size]


install = patching((GPTNeoSelfAttention, "_attn", _attn))


register(Family(
    "gpt_neo", ("gpt_neo",),
    attention_modules=lambda model: [m for m in model.modules() if isinstance(m, GPTNeoSelfAttention)],
    install=install,
    lockstep=False,  # causal: lockstep cannot hand its classifier each sentence's last token (crisp.lockstep.fusable)
    dropout={"hidden": "resid_dropout", "attention": "attention_dropout"},
))
