"""Sparse models that save and load: crisp's settings travel in config.json and come back as the model is built.

``crisp.save_pretrained(model, folder, tokenizer)`` writes what ``model.save_pretrained`` writes (config, weights;
the tokenizer when given) and adds two keys to config.json: ``attn_implementation: "crisp"`` (transformers reads
it as the model's attention implementation) and ``crisp`` (each attention layer's sparsity, the sparsifier with
its own keys, ``apply_in_eval`` and ``track_stats``). Loading the folder after ``import crisp`` gives back a
model that is sparse as saved: transformers has no hook for "a model was built", so crisp wraps
``PreTrainedModel.post_init`` (which every model runs at the end of its ``__init__``, for ``from_pretrained``
and ``from_config`` alike) to apply the saved settings to a crisp model whose config holds them. Without
``import crisp`` transformers refuses the folder (``attn_implementation="crisp"`` is unknown to it) instead of
loading it dense.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from torch import nn

CONFIG_KEY = "crisp"
IMPLEMENTATION = "crisp"  # crisp.sparsity.attention.NAME (that module imports this one)


def settings(model: nn.Module) -> dict:
    """What config.json keeps of ``model``'s crisp settings: per-layer sparsity, the sparsifier and its own keys,
    apply_in_eval, track_stats."""
    from crisp.sparsity.layers import attention_layers

    modules = attention_layers(model)
    sparsity = [getattr(m, "crisp_sparsity", 0.0) for m in modules]
    if any(isinstance(s, tuple) for s in sparsity):
        raise ValueError("a lockstep group's model holds one sparsity per run: save each run's own model")
    switches = {}
    for name, default in (("apply_in_eval", True), ("track_stats", True)):
        values = {bool(getattr(m, f"crisp_{name}", default)) for m in modules}
        if len(values) > 1:
            raise ValueError(f"the attention layers disagree on {name}: set it with crisp.configure(model, ...)")
        switches[name] = values.pop()
    sparsifiers = {(getattr(m, "crisp_sparsifier", "topk"),
                    json.dumps(getattr(m, "crisp_sparsifier_params", None) or {}, sort_keys=True)) for m in modules}
    if len(sparsifiers) > 1:
        raise ValueError("the attention layers disagree on their sparsifier: set it with crisp.set_sparsifier")
    name, params = sparsifiers.pop()
    params = json.loads(params)
    if any(isinstance(v, list) for v in params.values()):
        raise ValueError("a lockstep group's model holds one sparsifier setting per run: save each run's own model")
    return {"sparsity": [float(s) for s in sparsity], "sparsifier": name, "sparsifier_params": params, **switches}


def save_pretrained(model: nn.Module, directory: str | os.PathLike, tokenizer=None, **kwargs) -> Path:
    """Save ``model`` (and ``tokenizer``) to ``directory`` so that it loads back sparse, as saved (see the module).
    ``kwargs`` go to ``model.save_pretrained``. Returns the folder."""
    saved = settings(model)
    directory = Path(directory)
    model.save_pretrained(directory, **kwargs)
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update({"attn_implementation": IMPLEMENTATION, CONFIG_KEY: saved})
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    partial.replace(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def restore(model: nn.Module) -> None:
    """Apply the crisp settings in ``model.config`` (a saved crisp model's) to its attention layers."""
    from crisp.sparsity.layers import configure, set_sparsity

    saved = getattr(model.config, CONFIG_KEY)
    set_sparsity(model, saved["sparsity"])
    configure(model, sparsifier=saved.get("sparsifier", "topk"), apply_in_eval=saved.get("apply_in_eval"),
              track_stats=saved.get("track_stats"), **(saved.get("sparsifier_params") or {}))


def restore_on_init(post_init):
    """``PreTrainedModel.post_init``, then the saved crisp settings of a crisp model whose config holds them
    (this module loads the sparsity layer only then: registration stays light)."""

    @functools.wraps(post_init)
    def post_init_then_restore(self, *args, **kwargs):
        result = post_init(self, *args, **kwargs)
        config = getattr(self, "config", None)
        crisp_model = getattr(config, "_attn_implementation", None) == IMPLEMENTATION
        if crisp_model and getattr(config, CONFIG_KEY, None) is not None:
            restore(self)
        return result

    post_init_then_restore.crisp_restores = True
    return post_init_then_restore
