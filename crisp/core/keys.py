"""Strict keys: what each config group may hold, so that a key crisp would not use is refused by name.

``+data.text_column=review`` or ``+trainer.acumulate_grad_batches=2`` would otherwise be accepted and do
nothing. :func:`check_keys` refuses every key of ``model``, ``trainer``, ``logger``, ``report`` and ``sweep`` that
is not one of the keys below (``data``'s keys are checked with the data source, the sparsifier's with its registry
entry, the top level, ``optim`` and ``dropout`` against the schema's fields), naming the key and the keys allowed
there.

``trainer`` takes every argument of ``pytorch_lightning.Trainer`` (read from Lightning's source, so that
checking a config does not import Lightning) besides crisp's own keys; the few that crisp sets itself
(the logger, the callbacks, the run's directory) are refused with the key that sets them instead.
``callbacks`` holds named entries, each a mapping with the class path Hydra instantiates (``_target_``).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crisp.core.errors import ConfigError

# the trainer keys that are crisp's, not Lightning's (conf/trainer/auto.yaml says what each does)
CRISP_TRAINER_KEYS = frozenset({"progress_refresh_rate", "save_checkpoint", "save_weights", "compile", "cuda_graphs",
                                "matmul_precision", "checkpoint_every_n_steps", "checkpoint_every_n_epochs",
                                "keep_checkpoint"})
# Lightning's Trainer arguments that crisp sets itself, and what sets them instead
SET_BY_CRISP = {
    "logger": "the logger group (logger=wandb, logger=csv or logger=none)",
    "callbacks": "the callbacks group",
    "plugins": "crisp (its cluster environment)",
    "default_root_dir": "the run's directory (hydra.run.dir, hydra.sweep.dir)",
    "enable_checkpointing": "trainer.checkpoint_every_n_steps or trainer.checkpoint_every_n_epochs (a checkpoint "
                            "the run resumes from), or callbacks=checkpoint (the best model)",
}
MODEL_KEYS = frozenset({"name_or_path", "label", "tokenizer", "tokenizer_vocab_size", "from_config"})
# conf/config.yaml's sections that are crisp's settings and no group's (their values are checked by validate)
SECTION_KEYS = {"report": frozenset({"after_sweep"}), "sweep": frozenset({"mps", "progress_every_s"})}
LOGGER_KEYS = {"wandb": frozenset({"name", "project", "entity", "mode"}), "csv": frozenset({"name"}),
               "none": frozenset({"name"})}


@functools.cache
def lightning_trainer_args() -> frozenset[str]:
    """The parameters of ``pytorch_lightning.Trainer.__init__``, read from its source without importing it."""
    spec = importlib.util.find_spec("pytorch_lightning")
    source = Path(spec.origin).parent / "trainer" / "trainer.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
            return frozenset(a.arg for a in [*init.args.args[1:], *init.args.kwonlyargs])
    raise RuntimeError(f"no Trainer class in {source}")


def _refuse(group: str, key: str, value: Any, allowed: set[str] | frozenset[str], also: str = "") -> None:
    raise ConfigError(f"{group}.{key}={value!r} is not allowed: {group} has no key {key!r} "
                      f"(its keys: {', '.join(sorted(allowed))}{also})")


def check_keys(cfg: Mapping[str, Any]) -> None:
    """Refuse the first key of ``model``, ``trainer``, ``logger``, ``report`` or ``sweep`` that crisp would not use
    (see the module)."""
    for key, value in (cfg.get("model") or {}).items():
        if key not in MODEL_KEYS:
            _refuse("model", key, value, MODEL_KEYS)
    for section, allowed in SECTION_KEYS.items():
        for key, value in (cfg.get(section) or {}).items():
            if key not in allowed:
                _refuse(section, key, value, allowed)
    lightning = lightning_trainer_args()
    for key, value in (cfg.get("trainer") or {}).items():
        if key in SET_BY_CRISP:
            raise ConfigError(f"trainer.{key}={value!r} is not allowed: crisp sets it; use {SET_BY_CRISP[key]}")
        if key not in lightning and key not in CRISP_TRAINER_KEYS:
            _refuse("trainer", key, value, CRISP_TRAINER_KEYS,
                    also=", and every argument of pytorch_lightning.Trainer")
    check_callbacks(cfg.get("callbacks") or {})
    logger = cfg.get("logger") or {}
    allowed = LOGGER_KEYS.get(logger.get("name"))
    if allowed is None:
        raise ConfigError(f"logger.name={logger.get('name')!r} is not allowed: choose one of {', '.join(LOGGER_KEYS)}")
    for key, value in logger.items():
        if key not in allowed:
            _refuse("logger", key, value, allowed)


def check_callbacks(callbacks: Mapping[str, Any]) -> None:
    """Each entry of ``callbacks`` names a class Hydra can instantiate: a ``_target_`` that is a dotted path
    whose top-level package is installed (the class itself is imported when the run builds its Trainer)."""
    for name, entry in callbacks.items():
        target = entry.get("_target_") if isinstance(entry, Mapping) else None
        if not isinstance(target, str) or "." not in target:
            raise ConfigError(f"callbacks.{name}={entry!r} is not allowed: a callback is a mapping with a _target_, "
                              f"the class path of a pytorch_lightning Callback (+callbacks.{name}._target_=pkg.Class)")
        if importlib.util.find_spec(target.split(".")[0]) is None:
            raise ConfigError(f"callbacks.{name}._target_={target!r} is not allowed: there is no installed package "
                              f"{target.split('.')[0]!r}")
