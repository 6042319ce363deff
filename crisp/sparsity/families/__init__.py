"""Encoder families: how crisp reaches each one's attention, and what lockstep needs to know of it.

A family is one module in this package that registers one :class:`Family` (:func:`register`):
the transformers ``model_type`` values it covers, how its attention modules are found, and, for an
encoder whose attention is computed inline instead of through transformers' attention registry, an
``install`` that routes it through crisp's function (MPNet's adapter). Lockstep training reads the
rest: whether pairs are told apart by ``token_type_ids``, the position id of a sentence's first token (packed
rows restart positions per sentence), the query, key and value projections it fuses into one matmul, and the
config attributes behind crisp's dropout keys.

A model of no known family is used as it is when its attention dispatches through the registry, and those
particulars are read from the model itself (:func:`derived`): RoBERTa, XLM-R, ELECTRA and the other BERT-style
encoders need no module of their own.
:func:`check_reached` makes sure of that before training (every attention module found runs crisp's function,
and no attention runs outside it): a model whose attention crisp cannot reach would otherwise train dense with
no sign of it. It raises :class:`~crisp.sparsity.errors.AttentionNotReached`, the one refusal.
"""

from __future__ import annotations

import importlib
import pkgutil
import types
import weakref
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


def first_position_of_embeddings(model: nn.Module) -> int:
    """The position id the model's embeddings give a sentence's first token when they number positions
    themselves: RoBERTa-style embeddings (``create_position_ids_from_input_ids``) start after the padding id, as
    they number a sentence of no padding; others start at 0."""
    for module in model.modules():
        number = getattr(module, "create_position_ids_from_input_ids", None)
        padding = getattr(module, "padding_idx", None)
        if callable(number) and isinstance(padding, int):
            return int(number(torch.full((1, 2), padding + 1), padding)[0, 0])
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
# a model of no known family whose attention dispatches through transformers' registry (see derived)
REGISTRY = Family("registry", ())
# crisp's dropout keys -> the config attributes BERT-style configs hold them in
BERT_DROPOUT = {"hidden": "hidden_dropout_prob", "attention": "attention_probs_dropout_prob",
                "classifier": "classifier_dropout"}
# how registry attention modules name their query, key and value projections (Linears of one input)
PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"),
               ("q", "k", "v"))
_DERIVED: weakref.WeakKeyDictionary[nn.Module, Family] = weakref.WeakKeyDictionary()


def patching(*patches: tuple[type, str, Callable]) -> Callable[[nn.Module], None]:
    """An ``install`` that binds each ``(module class, method name, function)`` patch's function as that method of
    every module of the class in a model: how an adapter routes an encoder's inline attention through crisp's."""
    def install(model: nn.Module) -> None:
        for module in model.modules():
            for cls, name, function in patches:
                if isinstance(module, cls):
                    setattr(module, name, types.MethodType(function, module))
    return install


def register(family: Family) -> Family:
    """Make ``family`` known by its ``model_types`` (each family module calls this once, on import)."""
    FAMILIES[family.name] = family
    return family


def _load() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def family_of(model: nn.Module) -> Family:
    """The model's family: its module's, or the particulars :func:`derived` reads from the model."""
    family = family_of_type(getattr(getattr(model, "config", None), "model_type", None))
    return derived(model) if family is REGISTRY else family


def family_of_type(model_type: str | None) -> Family:
    """The family whose module covers ``model_type``, or :data:`REGISTRY` (nothing known of it)."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), REGISTRY)


def derived(model: nn.Module) -> Family:
    """A registry model's family, read from the model (once per model object, before it is fused): token types
    where its config has more than one, the first position from its embeddings
    (:func:`first_position_of_embeddings`), the query, key and value Linears of its attention modules under the
    names they have (:data:`PROJECTIONS`) and the dropout keys its config holds (:func:`dropout_attributes`)."""
    family = _DERIVED.get(model)
    if family is None:
        config = model.config
        modules = registry_attention_modules(model)
        names = next((names for names in PROJECTIONS if modules and all(
            all(type(getattr(m, n, None)) is nn.Linear for n in names) for m in modules)), ())
        family = _DERIVED[model] = Family(
            config.model_type, (config.model_type,), token_types=getattr(config, "type_vocab_size", 0) > 1,
            first_position=first_position_of_embeddings, dropout=dropout_attributes(config), projections=names)
    return family


def dropout_attributes(config) -> dict[str, str]:
    """crisp's dropout keys (hidden, attention, classifier) -> the config attributes that hold them: the family's
    own, or for a model of no family the BERT-style names its config has (:data:`BERT_DROPOUT`)."""
    family = family_of_type(getattr(config, "model_type", None))
    if family is not REGISTRY:
        return dict(family.dropout)
    return {role: name for role, name in BERT_DROPOUT.items() if hasattr(config, name)}


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
