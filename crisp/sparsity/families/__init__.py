"""Encoder families: how crisp reaches each one's attention, and what lockstep needs to know of it.

A family is one module in this package holding one :class:`Family` (found by its ``FAMILY`` name):
the transformers ``model_type`` values it covers, how its attention modules are found, and, for an
encoder whose attention is computed inline instead of through transformers' attention registry, an
``install`` that routes it through crisp's function (MPNet's adapter). Lockstep training reads the
rest: whether pairs are told apart by ``token_type_ids`` and the position id of a sentence's first
token (packed rows restart positions per sentence).

A model of no known family is used as it is when its attention dispatches through the registry;
:func:`check_reached` makes sure of that before training (every attention module found runs crisp's function,
and no attention runs outside it): a model whose attention crisp cannot reach would otherwise train dense with
no sign of it. It raises :class:`~crisp.sparsity.errors.AttentionNotReached`, the one refusal.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from crisp.sparsity import visibility
from crisp.sparsity.attention import crisp_attention_forward, probe_reached
from crisp.sparsity.errors import AttentionNotReached  # noqa: F401 (re-exported: crisp.AttentionNotReached)
from crisp.sparsity.inline import InlineAttention


def registry_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The innermost modules whose class name ends in "Attention" and that carry the model config
    through which transformers dispatches to the attention registry, in depth order."""
    found = []
    for module in model.modules():
        if not type(module).__name__.endswith("Attention") or not hasattr(module, "config"):
            continue
        if not any(m is not module and type(m).__name__.endswith("Attention") for m in module.modules()):
            found.append(module)
    return found


def first_position_zero(model: nn.Module) -> int:
    return 0


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # pairs are told apart by token_type_ids (BERT); families without them see one token stream
    token_types: bool = False
    # the position id of a model's first token (RoBERTa-style embeddings start after the padding id)
    first_position: Callable[[nn.Module], int] = first_position_zero
    attention_modules: Callable[[nn.Module], list[nn.Module]] = registry_attention_modules
    # routes the family's inline attention through crisp's function; None: it uses the registry
    install: Callable[[nn.Module], None] | None = None
    # crisp's dropout keys (hidden, attention, classifier) -> the family's config attributes
    dropout: dict[str, str] = field(default_factory=dict)
    # the Linears of an attention module that read one input (query, key, value): lockstep fuses them
    projections: tuple[str, ...] = ()
    # whether lockstep may train several runs of it as one fused model (an adapter checked alone, not yet in a
    # fused group, says False: such a family trains one process per run)
    lockstep: bool = True


FAMILIES: dict[str, Family] = {}
# a model of no known family whose attention dispatches through transformers' registry
REGISTRY = Family("registry", ())


def _load() -> None:
    for info in pkgutil.iter_modules(__path__):
        family = importlib.import_module(f"{__name__}.{info.name}").FAMILY
        FAMILIES[family.name] = family


def family_of(model: nn.Module) -> Family:
    return family_of_type(getattr(getattr(model, "config", None), "model_type", None))


def family_of_type(model_type: str | None) -> Family:
    return next((f for f in FAMILIES.values() if model_type in f.model_types), REGISTRY)


def supported() -> str:
    return (f"the families {', '.join(sorted(FAMILIES))}, or a model whose attention dispatches through "
            "transformers' AttentionInterface")


def install(model: nn.Module) -> None:
    """Route the model's attention through crisp's function (once; a no-op for registry families)."""
    family = family_of(model)
    if family.install is not None and not getattr(model, "crisp_installed", False):
        family.install(model)
        model.crisp_installed = True


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` in depth order: the ones that carry crisp's settings."""
    install(model)
    return family_of(model).attention_modules(model)


# the dry forward's sentence length: unlikely to be the size of anything else a softmax runs over (experts)
_PROBE_LENGTH = 11


@torch.no_grad()
def check_reached(model: nn.Module) -> None:
    """A dry forward of two short sentences (one padded): every attention layer must run crisp's function and
    no attention may run outside it (:mod:`crisp.sparsity.inline`), or :class:`AttentionNotReached` names the
    model class, what was not reached and what is supported. A model that passes reads crisp's boolean masks
    from then on (:func:`crisp.sparsity.visibility.mask_for`)."""
    modules = attention_modules(model)
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    length, short = _PROBE_LENGTH, _PROBE_LENGTH - 4
    ids = (torch.arange(2 * length, device=device).view(2, length) + 5) % vocab
    mask = torch.ones_like(ids)
    mask[1, short:] = 0
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    eos, pad = getattr(config, "eos_token_id", None), getattr(config, "pad_token_id", None)
    if isinstance(eos, int) and eos < vocab:  # encoder-decoder classifiers pool at each sentence's end token
        ids[0, -1], ids[1, short - 1] = eos, eos
    if isinstance(pad, int) and pad < vocab:  # decoder classifiers find a sentence's last token by the padding id
        ids[1, short:] = pad
    was_training = model.training
    model.eval()
    try:
        with probe_reached() as reached, InlineAttention(length, crisp_attention_forward.__code__) as inline:
            model(input_ids=ids, attention_mask=mask)
    except AttentionNotReached as refused:  # crisp's function met what it does not implement
        raise not_reached(model, f"{refused}; it would train with the wrong attention") from None
    finally:
        model.train(was_training)
    missed = [i for i, m in enumerate(modules) if id(m) not in reached]
    if not modules or missed or inline.found:
        where = ["no attention layer was found"] if not modules else \
            [f"layers {missed} of {len(modules)} bypass it in a forward of two sentences"] if missed else []
        where += [f"{inline.found} attention softmax(es) ran outside it"] if inline.found else []
        raise not_reached(model, f"{' and '.join(where)}: attention computed without transformers' attention "
                                 "registry (or a tower that text does not reach) would train dense")
    visibility.reached(model)


def not_reached(model: nn.Module, why: str) -> AttentionNotReached:
    """The refusal, in one line: the model class, what was not reached and why, what crisp supports."""
    return AttentionNotReached(f"crisp's attention does not run in {type(model).__name__} ({why}). "
                               f"crisp supports {supported()}.")


_load()
