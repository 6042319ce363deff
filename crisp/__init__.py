"""crisp: top-k attention sparsity as a regularizer for Hugging Face encoders.

``import crisp`` registers the ``"crisp"`` attention implementation with transformers::

    model = AutoModelForSequenceClassification.from_pretrained(name, attn_implementation="crisp")
    crisp.set_sparsity(model, 0.8)

Layers, each importing only the ones above it in this list: :mod:`crisp.sparsity` (the sparsifier),
:mod:`crisp.core` (a run's config, claim, results and lifecycle), :mod:`crisp.training` (tasks, data,
encoders, one run's training), :mod:`crisp.lockstep` (many runs as one fused model), :mod:`crisp.sweep`
(launchers); then the entry points ``crisp.run``, ``crisp.report`` and ``crisp.bench``.

Importing crisp stays light (the command line answers a config error within a second or two): the
API below loads on first use, and the registration runs as soon as transformers' modeling code has
loaded (at once if it already has), before any model can ask for ``attn_implementation="crisp"``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
_API = {
    "AttentionNotReached": "crisp.sparsity.errors",
    "LayerStats": "crisp.sparsity.layers",
    "attention_stats": "crisp.sparsity.layers",
    "configure": "crisp.sparsity.layers",
    "get_sparsity": "crisp.sparsity.layers",
    "prepare": "crisp.sparsity.layers",
    "set_sparsifier": "crisp.sparsity.layers",
    "set_sparsity": "crisp.sparsity.layers",
    "SPARSIFIERS": "crisp.sparsity.registry",
    "register_sparsifier": "crisp.sparsity.registry",
    "STRATEGIES": "crisp.sparsity.strategies",
    "apply_strategy": "crisp.sparsity.calibration",
    "register_strategy": "crisp.sparsity.strategies",
    "save_pretrained": "crisp.sparsity.saving",
}
__all__ = sorted(_API)
# crisp modules that register themselves with a transformers module as it loads: the attention function and
# its mask format with the registry, and the attention class GPT-Neo looks up by implementation name
_AFTER = {
    "transformers.modeling_utils": "crisp.sparsity.attention",
    "transformers.models.gpt_neo.modeling_gpt_neo": "crisp.sparsity.families.gpt_neo",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'crisp' has no attribute {name!r}")


def _register(name: str) -> None:
    # a crisp module registers itself as it loads; one that is loading now (its own import of transformers
    # brought us here) will, as it finishes
    if _AFTER[name] not in sys.modules:
        importlib.import_module(_AFTER[name])


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Runs a registration right after its transformers module executes (see ``_AFTER``)."""

    def __init__(self):
        self.waiting = {name for name in _AFTER if name not in sys.modules}

    def find_spec(self, name, path, target=None):
        if name not in self.waiting:
            return None
        self.waiting.discard(name)
        if not self.waiting:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register(name)

        spec.loader.exec_module = exec_module
        return spec


for _name in [name for name in _AFTER if name in sys.modules]:
    _register(_name)
if any(name not in sys.modules for name in _AFTER) and not any(
    isinstance(finder, _RegisterWithTransformers) for finder in sys.meta_path
):
    sys.meta_path.insert(0, _RegisterWithTransformers())
