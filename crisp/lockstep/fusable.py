"""Whether lockstep can train runs of a model as one fused model, and if not, why: decided from its config alone.

A fused model (:mod:`crisp.lockstep.fused`) runs transformers' modeling code unchanged on packed rows that hold
several sentences of every run, so a model fuses when that code computes, for each sentence, what it computes
alone. :func:`why_not_fused` builds two copies of the model on the meta device (no weights, no memory) and checks,
the same way for every family (a family module of :mod:`crisp.sparsity.families` or one read from the model,
:func:`crisp.sparsity.families.derived`):

- it is an encoder: a decoder or an encoder-decoder reads each sentence's last (or end) token, and packed rows keep
  no last token per sentence (the fused model hands the head each sentence's first);
- its family has not opted out (``Family.lockstep``);
- its base model takes ``position_ids``: packed sentences restart their positions, which a model that numbers
  positions by row would not;
- every parameter sits in a Linear, Embedding or LayerNorm with weight and bias, the modules lockstep fuses;
- the two copies fused, a forward of packed sentences (with sparsity, token types and positions as training gives
  them) runs and gives one row of logits per sentence: a model that reads the padding mask beyond attention, takes
  inputs that text does not give, or pools inside its base model where the fused model cannot reach fails here.

That the numbers of a fused model are each run's own is what ``tests/test_fusion.py`` checks, for every type of the
installed transformers that passes. The sweep decides with it from the model's config before anything trains
(:mod:`crisp.sweep.lockstep_launcher`), and a lockstep group checks its runs' model again before it fuses them.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from crisp.sparsity.families import attention_modules, family_of

FUSED_MODULES = (nn.Linear, nn.Embedding, nn.LayerNorm)
_PROBE_LENGTHS = (5, 3, 7)  # sentences packed two to a row of 8 tokens, the second row holding one


def classifier_name(config) -> str:
    """The sequence classifier class of ``config``'s model type, by name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type, config.model_type)


def why_not_fused(config) -> str | None:
    """Why lockstep cannot train runs of the model of ``config`` as one fused model (one clause), or None."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        models = [AutoModelForSequenceClassification.from_config(config, attn_implementation="crisp").eval()
                  for _ in range(2)]
    return _structure(models[0]) or _probe(models)


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one CPU thread inside: the sweep forks its workers after deciding, and a process whose CPU thread
    pool has started cannot fork safely (the child's first parallel operation waits forever)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _structure(model: nn.Module) -> str | None:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder: its classifier reads each sentence's end token, which packed rows do not keep"
    if getattr(config, "is_decoder", False) or any(getattr(m, "is_causal", False) for m in attention_modules(model)):
        return "causal: its classifier reads each sentence's last token, which packed rows do not keep"
    family = family_of(model)
    if not family.lockstep:
        return f"its family module crisp/sparsity/families/{family.name.replace('-', '_')}.py opts out of lockstep"
    base = getattr(model, model.base_model_prefix, model)
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__} takes no position_ids, and packed sentences restart their positions"
    others = sorted({_named(module) for module in model.modules()
                     if next(module.parameters(recurse=False), None) is not None and not _fusable(module)})
    if others:
        return (f"parameters in {', '.join(others)}: lockstep fuses only Linear, Embedding and LayerNorm (with "
                "weight and bias)")
    return None


def _named(module: nn.Module) -> str:
    return f"{type(module).__name__}{' without bias' if type(module) is nn.LayerNorm else ''}"


def _fusable(module: nn.Module) -> bool:
    if type(module) is nn.LayerNorm:
        return module.weight is not None and module.bias is not None
    return type(module) in FUSED_MODULES


@torch.no_grad()
@_one_thread()
def _probe(models: list[nn.Module]) -> str | None:
    """A fused forward of packed sentences on the meta device: None when it gives one row of logits per sentence."""
    from crisp.lockstep.dropout import RunRandom
    from crisp.lockstep.fused import fuse, sentences_start_at
    from crisp.lockstep.packing import attention_mask, pack
    from crisp.sparsity.attention import RunRows, batch_of_runs
    from crisp.training.data import TokenizedSplit

    family = family_of(models[0])
    lengths = torch.tensor(_PROBE_LENGTHS)
    real = torch.arange(max(_PROBE_LENGTHS)) < lengths[:, None]
    ids = (torch.arange(max(_PROBE_LENGTHS)) + 5)[None].expand(len(lengths), -1) * real
    types = ((torch.arange(ids.size(1)) >= lengths[:, None] // 2) & real).long() if family.token_types else None
    split = TokenizedSplit(ids, lengths, torch.zeros(len(lengths), dtype=torch.long), token_type_ids=types)
    first = family.first_position(models[0])
    try:
        fused = fuse(models, RunRandom([0, 1], "cpu"), projections=family.projections).eval()
        for module in attention_modules(fused):
            module.crisp_sparsity = (0.0, 0.5)
        batch = {k: v.to("meta") for k, v in pack([(split, list(range(len(lengths))))] * 2, width=8).items()}
        extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        with batch_of_runs(RunRows(2, query_valid=batch["segments"] >= 0)), sentences_start_at(batch["first"]):
            logits = fused(input_ids=batch["input_ids"], attention_mask=attention_mask(batch["segments"]),
                           position_ids=batch["position_ids"] + first, **extra).logits
    except Exception as err:  # noqa: BLE001 (whatever fails here fails in training: it is the reason)
        line = re.sub(r"\s+", " ", str(err).strip().splitlines()[0] if str(err).strip() else "")[:200]
        return f"a fused forward of packed sentences fails ({type(err).__name__}: {line})"
    expected = (2 * len(lengths), models[0].config.num_labels)
    if tuple(logits.shape) != expected:
        return (f"a fused forward of {expected[0]} packed sentences gives logits of shape {tuple(logits.shape)}, not "
                f"{expected}: its classifier does not read the one state per sentence that lockstep hands it")
    return None
