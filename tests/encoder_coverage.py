"""Which sequence classifiers of the installed transformers crisp makes sparse, each checked on a tiny random model.

Every model type with a ``...ForSequenceClassification`` class in transformers' auto mapping (read from the
mapping, so a newer transformers is covered as it comes) is built from a tiny config twice, with
``attn_implementation="crisp"`` and ``"eager"`` and the same weights, and has exactly one outcome:

- **sparse**: at sparsity 0 its logits and hidden states equal eager's within 1e-5 (fp32), with padding and
  without; at sparsity 0.8 every query row that may see its own key keeps exactly ``k`` of the ``n`` keys it may
  see and puts no probability on any other key (counted from the attention probabilities, and "may see" read
  from eager's own probabilities: what eager gives a positive probability); ``crisp.attention_stats`` equals
  that count; a causal model's earlier positions never move when a later token changes, padded or not;
- **refused**: :class:`crisp.AttentionNotReached` from ``crisp.prepare``, and the model, loaded with
  ``attn_implementation="crisp"`` and never prepared, computes what eager computes (its stock attention with
  the right mask, never crisp's boolean mask added as numbers);
- **not built**: the type cannot be built tiny here (a missing library, a config that does not shrink); why.

A sparse type also says whether lockstep trains it (``fuses``: two runs fused and fed packed sentences compute
each run's own logits, :func:`assert_fused_equals_alone`) or why not (:func:`crisp.lockstep.fusable.why_not_fused`).

Anything else (a crash, a wrong number) fails :func:`examine` with an AssertionError.
``python -m tests.encoder_coverage`` writes ``docs/encoders.md`` from the outcomes; ``tests/test_coverage.py``
checks each type against it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForSequenceClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

import crisp
from crisp.lockstep.dropout import RunRandom
from crisp.lockstep.fusable import why_not_fused
from crisp.lockstep.fused import fuse, sentences_start_at
from crisp.lockstep.packing import attention_mask, pack
from crisp.sparsity.attention import RunRows, batch_of_runs
from crisp.sparsity.families import attention_modules, family_of
from crisp.training.data import TokenizedSplit

TABLE = Path(__file__).resolve().parents[1] / "docs" / "encoders.md"
SPARSE, REFUSED, NOT_BUILT = "sparse", "refused", "not built"
FUSES = "fuses"
SPARSITY = 0.8
VOCAB, PAD, BOS, EOS = 99, 1, 2, 3
LENGTHS = (10, 7, 4)  # a padded batch (right padding); the unpadded one is two rows of the longest
CHANGED = 3  # the position whose token changes in the causality check: every row is longer
MAX_PARAMETERS = 5_000_000  # a "tiny" model above this did not shrink: listed as not built

# the common sizes of a tiny model, under every name configs give them (only the names a config has are used)
SIZES = {
    "vocab_size": VOCAB, "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "embed_dim": 32,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2,
    "intermediate_size": 64, "n_inner": 64, "hidden_dim": 64, "d_ff": 64, "ffn_dim": 64, "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64, "head_dim": 8, "d_kv": 8, "embedding_size": 32,
    "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64,
    "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS, "decoder_start_token_id": BOS,
    # local windows short enough to bite in a row of 10 tokens
    "sliding_window": 5, "local_attention": 6,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
}
# what a tiny config of one type needs besides the sizes above (its own names, or values that must agree)
# multi-head latent attention: one key/value head per query head, low-rank projections of their own sizes
_LATENT = {"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 8,
           "qk_rope_head_dim": 4, "v_head_dim": 8}
QUIRKS = {
    **dict.fromkeys(("axk1", "axk2", "deepseek_v2", "deepseek_v3", "minicpm3", "mistral4"), _LATENT),
    **dict.fromkeys(("qwen3_5_text", "qwen3_next"), {
        "layer_types": ["linear_attention", "full_attention"], "linear_key_head_dim": 8, "linear_value_head_dim": 8,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4}),
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "esmc": {"num_key_value_heads": 4},
    "lilt": {"hidden_size": 48},  # its six box embeddings split the hidden size
    "reformer": {"attn_layers": ["local", "lsh"], "axial_pos_shape": [8, 8], "axial_pos_embds_dim": [16, 16]},
    "roc_bert": {"pronunciation_embed_dim": 8, "pronunciation_vocab_size": 8, "shape_embed_dim": 8,
                 "shape_vocab_size": 8},
    "t5": {"decoder_start_token_id": BOS},
    "xmod": {"default_language": "en_XX"},
    "zamba": {"layers_block_type": ["mamba", "hybrid"]},
    "zamba2": {"layers_block_type": ["mamba", "hybrid"]},
    "deberta-v2": {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 8,
                   "share_att_key": True, "position_biased_input": False, "norm_rel_ebd": "layer_norm"},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4},
    "gptj": {"rotary_dim": 4},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "layoutlmv3": {"coordinate_size": 6, "shape_size": 4},
    "longformer": {"attention_window": 4},
    "luke": {"entity_vocab_size": 8, "entity_emb_size": 16},
    "perceiver": {"d_latents": 32, "num_latents": 8, "num_self_attends_per_block": 2, "qk_channels": 32,
                  "v_channels": 32},
}


@dataclasses.dataclass(frozen=True)
class Outcome:
    model_type: str
    kind: str  # SPARSE, REFUSED or NOT_BUILT
    class_name: str = ""
    notes: str = ""  # sparse: what its rows may see; refused and not built: why
    lockstep: str = ""  # sparse: FUSES, or why lockstep cannot train it


class NotBuilt(Exception):
    """The type cannot be built tiny here."""


def model_types() -> list[str]:
    return sorted(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)


def _fields(config_class) -> dict[str, object]:
    """A config class's fields and their defaults (an alias of ``attribute_map`` counts as its target)."""
    names = {f.name: f.default for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) \
        else {}
    return names | {alias: names.get(target) for alias, target in getattr(config_class, "attribute_map", {}).items()}


def tiny_values(config_class, model_type: str) -> dict[str, object]:
    fields = _fields(config_class)
    values = {name: value for name, value in SIZES.items() if name in fields}
    for name, default in fields.items():  # no dropout anywhere: eval mode aside, masks must be all that differs
        if ("dropout" in name or "pdrop" in name) and isinstance(default, float):
            values[name] = 0.0
    for name, sub_class in getattr(config_class, "sub_configs", {}).items():
        sub_type = getattr(sub_class, "model_type", "")
        if sub_class is not transformers.AutoConfig and sub_type:  # a text or vision tower of its own: tiny too
            values[name] = tiny_values(sub_class, sub_type)
    return values | QUIRKS.get(model_type, {})


def tiny_config(model_type: str):
    config_class = CONFIG_MAPPING[model_type]
    try:
        config = config_class(**tiny_values(config_class, model_type), num_labels=3)
    except Exception as err:  # noqa: BLE001 (any refusal of the config is the reason it is not built)
        raise NotBuilt(_first_line(err)) from None
    _shrink_towers(config)
    return config


def _shrink_towers(config) -> None:
    """A tower given by AutoConfig (or nested deeper) gets the tiny sizes it has names for."""
    for name in getattr(type(config), "sub_configs", {}):
        sub = getattr(config, name, None)
        if isinstance(sub, transformers.PretrainedConfig):
            for key, value in tiny_values(type(sub), sub.model_type).items():
                if not isinstance(value, dict):
                    setattr(sub, key, value)
            _shrink_towers(sub)


def _first_line(err: BaseException) -> str:
    """The line of an error that says what is wrong: an import error's first, a validation error's last."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = (lines[0] if isinstance(err, ImportError) else lines[-1]) if lines else ""
    text = f"{type(err).__name__}: {line}"
    return re.sub(r"\s+", " ", text)[:160]


def build(model_type: str) -> tuple[nn.Module, nn.Module]:
    """The crisp model and an eager copy with the same weights, in eval mode."""
    config = tiny_config(model_type)
    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())
    except Exception as err:  # noqa: BLE001
        raise NotBuilt(_first_line(err)) from None
    if size > MAX_PARAMETERS:
        raise NotBuilt(f"its tiny config still has {size:,} parameters")
    torch.manual_seed(0)
    try:
        eager = AutoModelForSequenceClassification.from_config(tiny_config(model_type), attn_implementation="eager")
    except Exception as err:  # noqa: BLE001
        raise NotBuilt(_first_line(err)) from None
    try:
        _forward(eager.eval(), *batch(True))
    except Exception as err:  # noqa: BLE001
        raise NotBuilt(f"its tiny eager model fails: {_first_line(err)}") from None
    model = AutoModelForSequenceClassification.from_config(tiny_config(model_type), attn_implementation="crisp")
    model.load_state_dict(eager.state_dict())
    return model.eval(), eager


def batch(padded: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens ending in EOS (encoder-decoder classifiers pool at it), right-padded when ``padded``."""
    lengths = LENGTHS if padded else (LENGTHS[0],) * 2
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (len(lengths), LENGTHS[0]), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, n - 1], ids[row, n:], mask[row, :n] = EOS, PAD, 1
    return ids, mask


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)


def _hidden_states(output) -> list[torch.Tensor]:
    found = []
    for name, value in output.items():
        if name.endswith("hidden_states") and isinstance(value, tuple):
            found += [h for h in value if isinstance(h, torch.Tensor) and h.dim() == 3]
    return found


def assert_same(model: nn.Module, eager: nn.Module, what: str) -> None:
    """Logits and every hidden state at real positions equal eager's within 1e-5, padded and unpadded."""
    for padded in (True, False):
        ids, mask = batch(padded)
        ours, theirs = _forward(model, ids, mask), _forward(eager, ids, mask)
        where = f"{what}, {'padded' if padded else 'unpadded'}"
        _assert_close(ours.logits, theirs.logits, where)
        real = mask.bool()
        for a, b in zip(_hidden_states(ours), _hidden_states(theirs), strict=True):
            if a.size(1) == real.size(1):
                a, b = a[real], b[real]
            _assert_close(a, b, f"{where}, hidden states")


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, where: str) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=lambda message: f"{where}: {message}")


def _probabilities(output) -> torch.Tensor | None:
    """The attention probabilities in an attention module's output: its 4-D tensor whose rows sum to 1 (T5's
    modules also return their position bias)."""
    items = output if isinstance(output, tuple) else (output,)
    return next((x for x in items if isinstance(x, torch.Tensor) and x.dim() == 4
                 and torch.allclose(x.sum(-1), torch.ones(()), atol=1e-4)), None)


def attention_probabilities(model: nn.Module, modules: list[nn.Module], ids, mask) -> list[list[torch.Tensor]]:
    """Each module's probabilities in one forward, one per call (ALBERT's layers call one module), caught from
    the modules' outputs (not from crisp)."""
    caught: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(modules))}

    def catch(i: int):
        def hook(module, args, output) -> None:  # returns nothing: the output stays the module's
            caught[i].append(_probabilities(output))
        return hook

    hooks = [m.register_forward_hook(catch(i)) for i, m in enumerate(modules)]
    try:
        _forward(model, ids, mask, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert all(calls and all(p is not None for p in calls) for calls in caught.values()), \
        "an attention module gave no probabilities"
    return [caught[i] for i in range(len(modules))]


def kept(n: torch.Tensor) -> torch.Tensor:
    """k for n visible keys at sparsity 0.8 = 4/5, in integers: max(1, n - floor(4n/5))."""
    return (n - (4 * n) // 5).clamp_min(1)


def visible_keys(eager_probs: torch.Tensor, other_probs: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """(keys each row may see, rows that count), from eager's probabilities for two inputs with one mask.

    A key is visible where eager gives it a positive probability, unless the row is a padding token's that saw
    no key at all: eager's softmax then spreads over the least masked keys whatever the scores, so the row is the
    same for both inputs (a row that sees one key holds a single 1 in both: it sees that key). A row counts where
    it sees its own key (self-attention: a real token, or a token the model is not told is padding) or, across
    sequences, any key. ``real`` marks the real tokens of the input (padding is on the right)."""
    if eager_probs.size(-2) == real.size(1):
        padding_query = ~real[:, None, :, None]
    else:
        padding_query = torch.zeros((), dtype=torch.bool)
    same = (eager_probs == other_probs).all(-1, keepdim=True) & (eager_probs.amax(-1, keepdim=True) < 1)
    visible = (eager_probs > 0) & ~(same & padding_query)
    square = visible.size(-1) == visible.size(-2)
    return visible, (visible.diagonal(dim1=-2, dim2=-1) if square else visible.any(-1))


def assert_exact_topk(model: nn.Module, eager: nn.Module) -> list[str]:
    """Exactly n - k zeros among each counted row's visible keys, none elsewhere, stats equal to the count;
    returns what the rows saw: "causal" (every self-attention over the input sees no later key), "local window"
    (a row sees fewer keys than its causal prefix or its sentence), and whether layers share a module (ALBERT)."""
    modules = attention_modules(model)
    names = {id(m): name for name, m in model.named_modules()}
    eager_modules = dict(eager.named_modules())
    crisp.set_sparsity(model, SPARSITY)
    crisp.configure(model, track_stats=True)
    ids, mask = batch(True)
    ours = attention_probabilities(model, modules, ids, mask)
    stats = crisp.attention_stats(model)
    reference = [eager_modules[names[id(m)]] for m in modules]
    theirs = attention_probabilities(eager, reference, ids, mask)
    others = attention_probabilities(eager, reference, batch(True, seed=1)[0], mask)
    causal, window, shared = [], False, False
    for layer, (p_calls, e_calls, other_calls) in enumerate(zip(ours, theirs, others, strict=True)):
        shared |= len(p_calls) > 1
        for call, (p, e, other) in enumerate(zip(p_calls, e_calls, other_calls, strict=True)):
            where = f"layer {layer}" + (f", call {call}" if len(p_calls) > 1 else "")
            visible, rows = visible_keys(e, other, mask.bool())
            n, zeros = _check_rows(p, visible, rows, where)
            if call == len(p_calls) - 1:  # the statistics are the module's last call's
                achieved = float(zeros[rows].sum() / n[rows].sum())
                said = stats[layer].achieved_sparsity
                assert abs(said - achieved) < 1e-6, f"{where}: attention_stats says {said:.6f}, the probabilities " \
                                                    f"{achieved:.6f}"
            if e.size(-1) == e.size(-2) == mask.size(1):  # self-attention over the input
                below = torch.ones(e.shape[-2:], dtype=torch.bool).tril()
                causal.append(not (visible & ~below).any())
                reachable = mask.bool()[:, None, None, :] & (below if causal[-1] else True)
                window |= bool((rows & (n < reachable.sum(-1))).any())
    crisp.set_sparsity(model, 0.0)
    return (["causal"] if causal and all(causal) else []) + (["local window"] if window else []) + \
        (["its layers share one attention module: one sparsity for all"] if shared else [])


def _check_rows(p: torch.Tensor, visible: torch.Tensor, rows: torch.Tensor, where: str):
    """Exactly n - k zeros among each counted row's n visible keys, and no probability on any other key."""
    assert p.shape == visible.shape, f"{where}: probabilities {tuple(p.shape)}, eager's {tuple(visible.shape)}"
    n = visible.sum(-1)
    zeros = ((p == 0) & visible).sum(-1)
    assert rows.any() and (n[rows] > 1).any(), f"{where}: no row to check"
    wrong = rows & (zeros != n - kept(n))
    assert not wrong.any(), (f"{where}: {int(wrong.sum())} rows keep other than k of their n visible keys "
                             f"(first: n={int(n[wrong][0])}, zeros={int(zeros[wrong][0])})")
    leaked = (p != 0) & ~visible & rows.unsqueeze(-1)
    assert not leaked.any(), f"{where}: probability on {int(leaked.sum())} keys the rows may not see"
    return n, zeros


def assert_causal(model: nn.Module) -> None:
    """At sparsity 0.8, a changed token at CHANGED moves no hidden state before it, padded or not."""
    crisp.set_sparsity(model, SPARSITY)
    for padded in (True, False):
        ids, mask = batch(padded)
        changed = ids.clone()
        changed[:, CHANGED] = torch.where(ids[:, CHANGED] == 5, 6, 5)
        before, after = _hidden_states(_forward(model, ids, mask)), _hidden_states(_forward(model, changed, mask))
        for layer, (a, b) in enumerate(zip(before, after, strict=True)):
            moved = (a[:, :CHANGED] - b[:, :CHANGED]).abs().max().item()
            assert moved <= 1e-6, f"{'padded' if padded else 'unpadded'}: hidden states {layer} moved by {moved:.2e}"
    crisp.set_sparsity(model, 0.0)


def grouped_query(model: nn.Module) -> bool:
    config = model.config.get_text_config()
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    return isinstance(heads, int) and isinstance(kv, int) and kv < heads


def examine(model_type: str) -> Outcome:
    """The type's one outcome; an AssertionError when it has neither."""
    try:
        model, eager = build(model_type)
    except NotBuilt as why:
        return Outcome(model_type, NOT_BUILT, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[model_type], str(why))
    except crisp.AttentionNotReached as refused:
        return Outcome(model_type, REFUSED, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[model_type],
                       _why(str(refused)))
    name = type(model).__name__
    try:
        crisp.prepare(model)
    except crisp.AttentionNotReached as refused:
        message = str(refused)
        assert name in message and "crisp supports" in message, message
        # its own attention with the right mask, or none at all (crisp's function refuses what it does not implement)
        with contextlib.suppress(crisp.AttentionNotReached):
            assert_same(model, eager, "refused, run as loaded")
        return Outcome(model_type, REFUSED, name, _why(message))
    assert_same(model, eager, "sparsity 0")
    notes = assert_exact_topk(model, eager)
    if "causal" in notes:
        assert_causal(model)
    if grouped_query(model):
        notes.append("grouped-query")
    family = family_of(model)
    if family.install is not None:
        notes.append(f"adapter {family.name}")
    lockstep = why_not_fused(tiny_config(model_type))
    if lockstep is None:
        assert_fused_equals_alone(tiny_config(model_type))
    return Outcome(model_type, SPARSE, name, ", ".join(notes), lockstep or FUSES)


FUSED_SPARSITIES = (0.0, 0.5)


def _seeded_models(config, seeds: tuple[int, ...]) -> list[nn.Module]:
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="crisp").eval()
        crisp.prepare(model)
        models.append(model)
    return models


def _sentences(token_types: bool, pad: int) -> TokenizedSplit:
    """Six sentences of 3 to 11 tokens (ids 5-59; pairs typed 0 then 1 where the model reads token types)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 12, (6,), generator=g)
    real = torch.arange(12) < lengths[:, None]
    ids = torch.where(real, torch.randint(5, 60, (6, 12), generator=g), pad)
    types = ((torch.arange(12) >= lengths[:, None] // 2) & real).long() if token_types else None
    return TokenizedSplit(ids, lengths, torch.zeros(6, dtype=torch.long), token_type_ids=types)


def assert_fused_equals_alone(config) -> None:
    """Two runs of ``config`` (seeds 0 and 1, sparsity 0 and 0.5) alone on a padded batch, then fused on the same
    sentences packed several to a row, as lockstep trains them: the same logits within 1e-5."""
    models = _seeded_models(config, (0, 1))
    family = family_of(models[0])
    split = _sentences(family.token_types, config.pad_token_id or 0)
    typed = {} if split.token_type_ids is None else {"token_type_ids": split.token_type_ids}
    alone = []
    for model, sparsity in zip(models, FUSED_SPARSITIES, strict=True):
        crisp.set_sparsity(model, sparsity)
        mask = (torch.arange(split.input_ids.size(1)) < split.lengths[:, None]).long()
        alone.append(_forward(model, split.input_ids, mask, **typed).logits)
    fused = fuse(models, RunRandom([0, 1], "cpu"), projections=family.projections).eval()
    for module in attention_modules(fused):
        module.crisp_sparsity = FUSED_SPARSITIES
    batch = pack([(split, list(range(len(split))))] * 2, width=16)
    assert batch["input_ids"].size(0) < 2 * len(split), "no two sentences share a row"
    typed = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    with torch.no_grad(), batch_of_runs(RunRows(2, query_valid=batch["segments"] >= 0)), \
            sentences_start_at(batch["first"]):
        logits = fused(input_ids=batch["input_ids"], attention_mask=attention_mask(batch["segments"]),
                       position_ids=batch["position_ids"] + family.first_position(fused), **typed).logits
    _assert_close(logits, torch.cat(alone), "fused in lockstep")


def _why(message: str) -> str:
    inner = re.search(r"\((.*)\)\. crisp supports", message)
    return inner.group(1) if inner else message


def table(outcomes: list[Outcome]) -> str:
    counts = {kind: sum(o.kind == kind for o in outcomes) for kind in (SPARSE, REFUSED, NOT_BUILT)}
    counts[FUSES] = sum(o.lockstep == FUSES for o in outcomes)
    lines = [
        "# Which sequence classifiers crisp makes sparse",
        "",
        f"Every model type with a `...ForSequenceClassification` class in transformers {transformers.__version__}, "
        "built tiny and random and checked against eager attention with the same weights "
        "(`tests/encoder_coverage.py` says how; `tests/test_coverage.py` checks each row). "
        f"{counts[SPARSE]} sparse, {counts[REFUSED]} refused, {counts[NOT_BUILT]} not built here.",
        "",
        "- **sparse**: exact top-k in every attention layer (k of the n keys each row may see: not padding, not "
        "the future for a causal model, inside the local window where the model has one), dense equals eager;",
        "- **refused**: `crisp.prepare` (and `python -m crisp.run`, exit 2) raises `AttentionNotReached` before "
        "anything trains; loaded with `attn_implementation=\"crisp\"` and never prepared it runs its stock "
        "attention with the mask it expects, or refuses to run;",
        "- **not built**: a tiny model of the type could not be built here, so it is unchecked.",
        "",
        f"lockstep (`hydra/launcher=lockstep`, and `auto` for runs that share a recipe): {counts[FUSES]} sparse types "
        "**fuse**, two runs fused and fed packed sentences computing each run's own logits; for the others, why "
        "lockstep cannot train them (`hydra/launcher=auto` then trains them one process per run).",
        "",
        "| model type | class | outcome | notes | lockstep |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        notes, lockstep = (text.replace("|", "\\|") for text in (o.notes, o.lockstep))
        lines.append(f"| `{o.model_type}` | {o.class_name} | {o.kind} | {notes} | {lockstep} |")
    return "\n".join(lines) + "\n"


def committed() -> tuple[str | None, dict[str, tuple[str, str, str]]]:
    """The committed table: the transformers version it was made with and, per type, (outcome, notes, lockstep)."""
    if not TABLE.exists():
        return None, {}
    text = TABLE.read_text()
    version = re.search(r"class in transformers (\S+),", text)
    rows = {}
    cell = r"((?:[^|\\]|\\.)*)"  # a cell's text, escaped bars included
    for match in re.finditer(rf"^\| `([^`]+)` \| [^|]* \| ([^|]+) \| {cell} \| {cell} \|$", text, re.MULTILINE):
        rows[match.group(1)] = (match.group(2).strip(), *(match.group(k).strip().replace("\\|", "|") for k in (3, 4)))
    return (version.group(1) if version else None), rows


def main() -> None:
    transformers.logging.set_verbosity_error()
    outcomes = []
    for model_type in model_types():
        outcome = examine(model_type)
        print(f"{model_type:24} {outcome.kind:9} {outcome.notes} [{outcome.lockstep}]", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    TABLE.write_text(table(outcomes))
    print(f"wrote {TABLE}", file=sys.stderr)


if __name__ == "__main__":
    main()
