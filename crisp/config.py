"""Config schema, value checks and resolvers.

Types are enforced by a structured config registered in Hydra's ConfigStore (``sparsity=abc`` fails
while Hydra composes); :func:`validate` checks ranges and choices before anything heavy runs, and
names the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from crisp.hub import minilm_dir
from crisp.results import effective_strategy
from crisp.strategies import MAX_LAYER_SPARSITY, STRATEGIES


class ConfigError(ValueError):
    """A config value that is not allowed: the message names the key, the value and what is allowed."""


@dataclass
class SparsifierConf:
    apply_in_eval: bool = True
    # per-layer statistics are measured on every validation batch and every N-th training step
    stats_every_n_steps: int = 50


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
class CrispConf:
    """The top level. Groups (model, data, strategy, trainer, logger) are typed by their own yaml."""

    sparsity: float = 0.0
    seed: int = 1
    name: str = MISSING
    tags: list[str] = field(default_factory=list)
    sparsifier: SparsifierConf = field(default_factory=SparsifierConf)
    optim: OptimConf = field(default_factory=OptimConf)
    model: Any = MISSING
    data: Any = MISSING
    strategy: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    report: Any = None
    sweep: Any = None


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The job's config without Hydra's own section, every interpolation resolved.

    Resolved key by key, so that it also works in a launcher's process, where Hydra's runtime
    fields (the output dir) are not set yet.
    """
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "hydra"}


def register_configs() -> None:
    ConfigStore.instance().store(name="crisp_schema", node=CrispConf)


def run_name(strategy: str, sparsity: float, seed: int) -> str:
    """A readable name: ``dense_seed1``, ``uniform_s0.8_seed2``."""
    strategy = effective_strategy(strategy, sparsity)
    return f"dense_seed{seed}" if strategy == "dense" else f"{strategy}_s{sparsity:g}_seed{seed}"


def parallel_jobs(per_gpu: int = 4) -> int:
    """Default number of simultaneous runs: ``per_gpu`` on each visible GPU, or half the CPU cores."""
    import os

    import torch

    gpus = torch.cuda.device_count()
    return per_gpu * gpus if gpus else max(1, (os.cpu_count() or 2) // 2)


def register_resolvers() -> None:
    resolvers = {
        "crisp.run_name": run_name,
        "crisp.minilm_dir": minilm_dir,
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


def validate(cfg: DictConfig) -> None:
    """Check every value whose range a type cannot express; raise ConfigError on the first bad one."""
    _check_number(cfg, "sparsity", 0, 1, closed_high=False)
    strategy = cfg.strategy.name
    if strategy not in STRATEGIES:
        _fail("strategy", strategy, f"choose one of {sorted(STRATEGIES)}")
    if strategy != "uniform" and cfg.sparsity > MAX_LAYER_SPARSITY:
        _fail("sparsity", cfg.sparsity, f"strategy {strategy} spreads sparsity over layers each in [0, 0.95]")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        _fail("seed", cfg.seed, "it must be a non-negative integer")
    _check_number(cfg, "optim.lr", 0, 1, closed_high=True)
    if cfg.optim.lr == 0:
        _fail("optim.lr", cfg.optim.lr, "it must be positive")
    _check_number(cfg, "optim.weight_decay", 0, 1)
    _check_number(cfg, "optim.warmup_ratio", 0, 1)
    if cfg.optim.fused not in ("auto", True, False):
        _fail("optim.fused", cfg.optim.fused, "choose auto, true or false")
    for key in ("trainer.max_epochs", "data.batch_size", "data.max_length"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(key, value, "it must be a positive integer")
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
    if cfg.data.name == "sst2_local" and not cfg.data.get("dir"):
        _fail("data.dir", cfg.data.get("dir"), "data=sst2_local needs data.dir=<folder with train.tsv and dev.tsv>")
