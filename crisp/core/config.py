"""Config schema, value checks and resolvers.

Types are enforced by a structured config registered in Hydra's ConfigStore (``sparsity=abc`` fails
while Hydra composes); :func:`validate` checks ranges and choices before anything heavy runs, and
names the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from crisp.core.data_config import check as check_data
from crisp.core.errors import ConfigError
from crisp.core.keys import check_keys
from crisp.core.model_dirs import minilm_dir, mpnet_dir
from crisp.core.results import effective_strategy
from crisp.sparsity import MAX_LAYER_SPARSITY, registry
from crisp.sparsity.strategies import NOT_PARAMETERS, load_strategy, strategy_parameters

# conf/ beside the package (a checkout) or inside it (an installed wheel)
CONF_DIR = next((p for p in (Path(__file__).resolve().parents[2] / "conf", Path(__file__).resolve().parents[1] / "conf")
                 if (p / "config.yaml").is_file()), Path(__file__).resolve().parents[1] / "conf")


@dataclass
class OptimConf:
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # "auto": the fused CUDA kernel on GPU, the foreach implementation elsewhere
    fused: Any = "auto"


@dataclass
class DropoutConf:
    """The encoder's dropout probabilities; None: the model's own (its config's)."""

    hidden: Optional[float] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    attention: Optional[float] = None  # noqa: UP045
    classifier: Optional[float] = None  # noqa: UP045


@dataclass
class CrispConf:
    """The top level. Groups (model, data, strategy, sparsifier, trainer, logger) are typed by their own yaml;
    the sparsifier's keys are checked against its registry entry (:func:`validate`)."""

    sparsity: float = 0.0
    seed: int = 1
    name: str = MISSING
    tags: list[str] = field(default_factory=list)
    sparsifier: Any = MISSING
    optim: OptimConf = field(default_factory=OptimConf)
    dropout: DropoutConf = field(default_factory=DropoutConf)
    model: Any = MISSING
    data: Any = MISSING
    strategy: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    callbacks: Any = field(default_factory=dict)
    objective: str = "final"
    report: Any = None
    sweep: Any = None


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The job's config without Hydra's own section, every interpolation resolved.

    Resolved key by key, so that it also works in a launcher's process, where Hydra's runtime
    fields (the output dir) are not set yet.
    """
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "hydra"}


def written_config(cfg: DictConfig) -> dict[str, Any]:
    """The job's config as written (interpolations left as they are), without Hydra's section."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}


def register_configs() -> None:
    ConfigStore.instance().store(name="crisp_schema", node=CrispConf)
    register_optuna()


def register_optuna() -> None:
    """``hydra/sweeper=optuna`` with crisp's defaults: it maximises each run's objective (the task's primary
    metric; :mod:`crisp.core.objective`), two trials at a time (the default launcher trains two trials that
    share a recipe as one lockstep group), as the study ``crisp``, its TPE sampler seeded (the same command
    again asks for the same trials: each finds its run completed in its directory). Stored in place of the
    plugin's own nodes once Hydra has scanned its plugins (the scan runs the plugin's module, which stores its
    nodes again): the entry point calls this after :func:`scan_plugins`. Without the plugin, nothing."""
    try:
        from hydra_plugins.hydra_optuna_sweeper.config import Direction, OptunaSweeperConf, TPESamplerConfig
    except ImportError:
        return
    store = ConfigStore.instance().store
    store(group="hydra/sweeper", name="optuna", provider="optuna_sweeper",
          node=OptunaSweeperConf(direction=Direction.maximize, study_name="crisp", n_jobs=2))
    store(group="hydra/sweeper/sampler", name="tpe", provider="optuna_sweeper", node=TPESamplerConfig(seed=1))


def scan_plugins() -> None:
    """Hydra's plugin scan now (once per process; Hydra would run it when it starts), then crisp's nodes that
    replace a plugin's (:func:`register_optuna`)."""
    from hydra.core.plugins import Plugins

    Plugins.instance()
    register_optuna()


def run_name(strategy: str, sparsity: float, seed: int, sparsifier: Any = None) -> str:
    """A readable name: ``dense_seed1``, ``uniform_s0.8_seed2`` (topk), ``random_uniform_s0.8_seed2``,
    ``entmax_alpha1.5_seed1`` (a sparsifier that does not use sparsity, by its parameter). Every
    sparsifier's sparsity 0 is the one dense run."""
    name = (sparsifier or {}).get("name", registry.DEFAULT)
    entry = registry.SPARSIFIERS.get(name)
    if entry is not None and not entry.uses_sparsity:
        key = entry.parameter
        shown = "" if key is None else f"_{key}{float(sparsifier.get(key, entry.keys[key].default)):g}"
        return f"{name}{shown}_seed{seed}"
    strategy = effective_strategy(strategy, sparsity)
    if strategy == "dense":
        return f"dense_seed{seed}"
    return f"{'' if name == registry.DEFAULT else f'{name}_'}{strategy}_s{sparsity:g}_seed{seed}"


def parallel_jobs(per_gpu: int = 4) -> int:
    """Default number of simultaneous runs: ``per_gpu`` on each visible GPU, or half the CPU cores."""
    import torch

    gpus = torch.cuda.device_count()
    return per_gpu * gpus if gpus else max(1, (os.cpu_count() or 2) // 2)


def glue_dir(folder: str) -> str | None:
    """A task's GLUE-format folder when one is set up: ``$CRISP_GLUE_DIR/<folder>`` (SST-2 also
    ``$CRISP_SST2_DIR``); None: the task comes from the hub."""
    candidates = [os.environ.get("CRISP_SST2_DIR")] if folder == "SST-2" else []
    if os.environ.get("CRISP_GLUE_DIR"):
        candidates.append(os.path.join(os.environ["CRISP_GLUE_DIR"], folder))
    return next((c for c in candidates if c and os.path.isdir(c)), None)


def register_resolvers() -> None:
    resolvers = {
        "crisp.run_name": run_name,
        "crisp.minilm_dir": minilm_dir,
        "crisp.mpnet_dir": mpnet_dir,
        "crisp.glue_dir": glue_dir,
        "crisp.parallel_jobs": parallel_jobs,
        # drawn once per sweep and cached (the cache travels with the config to every job)
        "crisp.uid": lambda: secrets.token_hex(2),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "crisp.uid")


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _check_number(cfg: DictConfig, key: str, low: float, high: float, *, closed_high: bool = True) -> None:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        _fail(key, value, f"it must be a number in [{low:g}, {high:g}{bracket}")


def _check_strategy(cfg: DictConfig) -> None:
    """The strategy is registered (importing the module its yaml names), takes the parameters its yaml
    sets, and can reach the mean sparsity asked for (:mod:`crisp.sparsity.strategies`' registry)."""
    spec = OmegaConf.to_container(cfg.strategy, resolve=True)
    try:
        fn = load_strategy(spec.get("name"), spec.get("module"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    allowed = strategy_parameters(fn)
    for key, value in spec.items():
        if key not in NOT_PARAMETERS and allowed is not None and key not in allowed:
            takes = ", ".join(sorted(allowed)) or "no parameters"
            _fail(f"strategy.{key}", value, f"strategy {spec['name']} takes {takes} (besides name and module)")
    if fn.clips and cfg.sparsity > MAX_LAYER_SPARSITY:
        _fail("sparsity", cfg.sparsity, f"strategy {spec['name']} spreads sparsity over layers each in "
                                        f"[0, {MAX_LAYER_SPARSITY}]")


def _check_sparsifier(cfg: DictConfig) -> None:
    """The sparsifier's choice and keys against its registry entry (:mod:`crisp.sparsity.registry`)."""
    node = cfg.sparsifier
    name, module = node.get("name", registry.DEFAULT), node.get("module")
    try:
        entry = registry.lookup(name, module)
    except ImportError as err:
        _fail("sparsifier.module", module, f"a module that registers sparsifier {name} ({err})")
    if entry is None:
        _fail("sparsifier", name, f"choose one of {sorted(registry.SPARSIFIERS)}"
              + ("" if module else " (a sparsifier of your own: sparsifier.module names the module that registers it)"))
    allowed = [*registry.COMMON_KEYS, *entry.keys]
    for key in node:
        if key not in allowed:
            _fail(f"sparsifier.{key}", node[key], f"sparsifier {name} has the keys {', '.join(allowed)}")
    if not isinstance(node.get("apply_in_eval", entry.apply_in_eval), bool):
        _fail("sparsifier.apply_in_eval", node.apply_in_eval, "choose true or false")
    steps = node.get("stats_every_n_steps", 50)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        _fail("sparsifier.stats_every_n_steps", steps, "it must be a positive integer")
    for key, spec in entry.keys.items():
        value = node.get(key, spec.default)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not spec.check(float(value)):
            _fail(f"sparsifier.{key}", value, f"sparsifier {name} takes {spec.allowed}")
    if not entry.uses_sparsity and cfg.sparsity != 0:
        _fail("sparsity", cfg.sparsity, f"sparsifier={name} does not use sparsity (its sparsity comes from the "
              f"scores{f', set by sparsifier.{entry.parameter}' if entry.parameter else ''}): leave sparsity at 0")


OBJECTIVES = ("final", "best")


def _check_checkpointing(trainer: DictConfig) -> None:
    every = {key: trainer.get(key) for key in ("checkpoint_every_n_steps", "checkpoint_every_n_epochs")}
    for key, value in every.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            _fail(f"trainer.{key}", value, "it must be a positive integer or null (no checkpoint)")
    if all(v is not None for v in every.values()):
        _fail("trainer.checkpoint_every_n_epochs", every["checkpoint_every_n_epochs"],
              f"set it or trainer.checkpoint_every_n_steps (={every['checkpoint_every_n_steps']}), not both")
    for key in ("keep_checkpoint", "save_checkpoint"):
        if not isinstance(trainer.get(key, False), bool):
            _fail(f"trainer.{key}", trainer.get(key), "choose true or false")
    if trainer.get("keep_checkpoint") and all(v is None for v in every.values()):
        _fail("trainer.keep_checkpoint", True, "it keeps the checkpoint that trainer.checkpoint_every_n_steps or "
              "trainer.checkpoint_every_n_epochs writes, and neither is set (trainer.save_checkpoint=true: one "
              "every epoch, kept)")


def _check_model_source(cfg: DictConfig) -> None:
    """A model comes from one place: a folder or hub name (``model.name_or_path``) next to a choice that builds a
    random-init model from ``model.from_config`` would not be loaded, and the run would train and be named as the
    random model."""
    model = cfg.model
    if model.get("tokenizer_vocab_size") is not None and model.get("tokenizer") != "train":
        _fail("model.tokenizer_vocab_size", model.tokenizer_vocab_size,
              f"it sizes a tokenizer trained on the data (model.tokenizer=train), and model.tokenizer="
              f"{model.get('tokenizer')!r}")
    if model.get("name_or_path") and model.get("from_config") is not None:
        built = (model.from_config or {}).get("model_type", "model")
        _fail("model.name_or_path", model.name_or_path,
              f"this model choice builds a random-init {built} from model.from_config and would not load it; to "
              "fine-tune it, choose a model that loads one (model=distilbert model.name_or_path=..., with its own "
              "tokenizer), or leave model.name_or_path unset to train the random-init model")


def _check_schema_keys(cfg: DictConfig) -> None:
    """A key added with ``+`` where the schema has none (``+optim.momentum=0.9``, ``+seeds=3``) passes Hydra (``+``
    adds past a structured config) and nothing would read it: refused, with the keys there are."""
    for section, schema in ((None, CrispConf), ("optim", OptimConf), ("dropout", DropoutConf)):
        allowed = {f.name for f in fields(schema)}
        node = cfg if section is None else cfg[section]
        for key in node:
            if key not in allowed and (section, key) != (None, "hydra"):
                where = key if section is None else f"{section}.{key}"
                _fail(where, node[key], f"{'the config' if section is None else section} has no key {key!r} "
                                        f"(its keys: {', '.join(sorted(allowed))})")


def _check_sweep_settings(cfg: DictConfig) -> None:
    for key in ("report.after_sweep", "sweep.mps"):
        if not isinstance(OmegaConf.select(cfg, key, default=False), bool):
            _fail(key, OmegaConf.select(cfg, key), "choose true or false")
    every = OmegaConf.select(cfg, "sweep.progress_every_s", default=30)
    if not isinstance(every, (int, float)) or isinstance(every, bool) or not (math.isfinite(every) and every > 0):
        _fail("sweep.progress_every_s", every, "it must be a number of seconds > 0")


def validate(cfg: DictConfig) -> None:
    """Check every value whose range a type cannot express; raise ConfigError on the first bad one."""
    _check_number(cfg, "sparsity", 0, 1, closed_high=False)
    _check_schema_keys(cfg)
    check_keys(cfg)
    _check_sweep_settings(cfg)
    _check_sparsifier(cfg)
    _check_strategy(cfg)
    name = str(cfg.name)
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        _fail("name", cfg.name, "a run's name is one folder name: no '/', not starting with '.'")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        _fail("seed", cfg.seed, "it must be a non-negative integer")
    _check_number(cfg, "optim.lr", 0, 1, closed_high=True)
    if cfg.optim.lr == 0:
        _fail("optim.lr", cfg.optim.lr, "it must be positive")
    _check_number(cfg, "optim.weight_decay", 0, 1)
    _check_number(cfg, "optim.warmup_ratio", 0, 1)
    for role in ("hidden", "attention", "classifier"):
        if cfg.dropout[role] is not None:
            _check_number(cfg, f"dropout.{role}", 0, 1, closed_high=False)
    if cfg.optim.fused not in ("auto", True, False):
        _fail("optim.fused", cfg.optim.fused, "choose auto, true or false")
    for key in ("trainer.max_epochs", "data.batch_size", "data.max_length"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(key, value, "it must be a positive integer")
    if cfg.get("objective", "final") not in OBJECTIVES:
        _fail("objective", cfg.objective, f"choose {' or '.join(OBJECTIVES)} (the task's primary metric at the final "
                                          "epoch, or at its best epoch)")
    _check_checkpointing(cfg.trainer)
    if not isinstance(cfg.trainer.get("save_weights", False), bool):
        _fail("trainer.save_weights", cfg.trainer.save_weights, "choose true or false")
    if cfg.trainer.cuda_graphs not in ("auto", True, False):
        _fail("trainer.cuda_graphs", cfg.trainer.cuda_graphs, "choose auto, true or false")
    if cfg.trainer.matmul_precision not in ("highest", "high", "medium"):
        _fail("trainer.matmul_precision", cfg.trainer.matmul_precision, "choose highest, high or medium")
    for key, null in (("data.train_limit", "all examples"), ("data.val_limit", "all examples"),
                      ("data.pad_to_multiple_of", "16 with CUDA graphs, else no rounding")):
        value = OmegaConf.select(cfg, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            _fail(key, value, f"it must be a positive integer or null ({null})")
    if cfg.data.get("pin_memory", "auto") not in ("auto", True, False):
        _fail("data.pin_memory", cfg.data.pin_memory, "choose auto (on when training on GPU), true or false")
    workers = cfg.data.get("num_workers", 0)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        _fail("data.num_workers", workers, "it must be a number of processes >= 0")
    _check_model_source(cfg)
    if cfg.data.name == "sst2_local" and not cfg.data.get("dir"):
        _fail("data.dir", cfg.data.get("dir"), "data=sst2_local needs data.dir=<folder with train.tsv and dev.tsv>")
    check_data(cfg.data)  # its keys, its task, its files (crisp/core/data_config.py)
