"""The one place a run is built: its data, tokenizer, encoder and per-layer sparsity, from its config.

A single run (:mod:`crisp.training.train`) and every run of a lockstep group (:mod:`crisp.lockstep.group`)
are built here, by the same steps in the same order, so a run trained in lockstep starts exactly where it
would start alone:

1. the seed, then the data (the seed orders synthetic data and batches);
2. the tokenizer (a model's own, or a word-level one over the training texts);
3. the seed again, then the encoder (its random initialisation depends on the seed alone), with crisp's
   attention in every layer and the dropout probabilities the config sets;
4. each split tokenized (cached on disk);
5. the strategy's per-layer sparsity, calibrated on the dense model where the strategy asks for it,
   and the sparsifier (its choice, its own keys, whether it applies in evaluation).

Runs built by one :class:`RunBuilder` share what they have in common instead of making it again: the
data of equal data configs, the tokenizer, the tokenized splits, and the initial model of a seed (runs of
one seed start from one model object; the fused model copies it per run, and a single run has it alone)
with its calibration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

import crisp
from crisp.core import heartbeat, results
from crisp.sparsity import registry
from crisp.sparsity.calibration import measure_entropy
from crisp.sparsity.families import family_of
from crisp.sparsity.strategies import load_strategy
from crisp.training.data import Split, TokenizedSplit, calibration_batches, load, tokenize
from crisp.training.encoder import build_encoder, build_tokenizer
from crisp.training.hub import resolve_model
from crisp.training.tasks import Task
from crisp.training.truncation import check_truncation


@dataclass
class BuiltRun:
    """A run ready to train: what the LightningModule and the data module of one run (or a group) take."""

    cfg: DictConfig
    task: Task
    tokenizer: Any
    encoder: torch.nn.Module  # shared by the runs of one seed that one builder built (see the module)
    train: TokenizedSplit
    vals: list[TokenizedSplit]  # the task's validation splits, in its order
    layer_sparsity: list[float]
    calibration_entropy: list[float] | None = None
    sparsifier_params: dict[str, float] | None = None  # the sparsifier's own keys (entmax's alpha)
    trained_model: dict[str, Any] | None = None  # the class and source of the model built (results.trained_model)


def _key(value: Any) -> str:
    return json.dumps(OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value,
                      sort_keys=True, default=str)


def check_hub(cfg: DictConfig) -> None:
    """An encoder that needs the unreachable hub fails now, before the data loads."""
    if cfg.model.name_or_path:
        resolve_model(cfg.model.name_or_path)


class RunBuilder:
    """Builds runs on ``device`` (see the module); one builder per process that trains them."""

    def __init__(self, device: torch.device):
        self.device = device
        self._splits: dict[str, tuple[Task, dict[str, Split]]] = {}
        self._tokenizers: dict[str, Any] = {}
        self._tokenized: dict[tuple[str, str, str], TokenizedSplit] = {}
        self._encoders: dict[tuple, torch.nn.Module] = {}
        self._entropies: dict[tuple, list[float]] = {}

    def build(self, cfg: DictConfig, name: str) -> BuiltRun:
        """The run of ``cfg``; ``name`` labels its allocation line."""
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        data_key = _key(cfg.data)
        if data_key not in self._splits:
            self._splits[data_key] = load(cfg.data)  # the task (label names read from the data) and its splits
        task, splits = self._splits[data_key]
        # a tokenizer trained on the training texts depends on the data too
        tok_key = _key([_key(cfg.model), data_key if cfg.model.tokenizer == "train" else None])
        if tok_key not in self._tokenizers:
            self._tokenizers[tok_key] = build_tokenizer(cfg.model, splits["train"].texts)
        tokenizer = self._tokenizers[tok_key]
        init_key = (tok_key, cfg.seed, _key(cfg.dropout))
        if init_key not in self._encoders:
            pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the model's init depends on the seed only
            encoder = build_encoder(cfg.model, tokenizer, task, dropout=cfg.dropout)
            self._encoders[init_key] = encoder.to(self.device).train()
        encoder = self._encoders[init_key]
        token_types = family_of(encoder).token_types
        for split in splits:
            if (tok_key, data_key, split) not in self._tokenized:
                check_truncation(tokenizer, splits[split], cfg.data.max_length, split)
                self._tokenized[tok_key, data_key, split] = tokenize(tokenizer, splits[split], cfg.data.max_length,
                                                                     token_types=token_types)
        train = self._tokenized[tok_key, data_key, "train"]
        vals = [self._tokenized[tok_key, data_key, split] for split in splits if split != "train"]
        strategy = OmegaConf.to_container(cfg.strategy, resolve=True)
        entropy = None
        if load_strategy(strategy["name"], strategy.get("module")).needs_entropy and cfg.sparsity > 0:
            calibration = (init_key, data_key, cfg.data.batch_size, cfg.data.calibration_batches)
            if calibration not in self._entropies:
                batches = calibration_batches(train, cfg.data.batch_size, cfg.data.calibration_batches, cfg.seed)
                self._entropies[calibration] = measure_entropy(encoder, batches)
            entropy = self._entropies[calibration]
        layer_sparsity = crisp.apply_strategy(encoder, strategy.pop("name"), cfg.sparsity, entropy=entropy, **strategy)
        params = use_sparsifier(encoder, cfg.sparsifier)
        allocation = ", ".join(f"{s:.3f}" for s in layer_sparsity)
        print(f"crisp: {name}: strategy={cfg.strategy.name} sparsity={cfg.sparsity:g} -> per-layer sparsity "
              f"[{allocation}]")
        heartbeat.beat(force=True)
        source = cfg.model.name_or_path if cfg.model.from_config is None else None
        return BuiltRun(cfg, task, tokenizer, encoder, train, vals, layer_sparsity, entropy, params,
                        results.trained_model(type(encoder).__name__, source))


def use_sparsifier(encoder: torch.nn.Module, node: DictConfig) -> dict[str, float]:
    """Make ``node``'s sparsifier (``conf/sparsifier/``) every layer's, statistics off until a step asks for
    them; returns its own keys as set."""
    spec = OmegaConf.to_container(node, resolve=True)
    name = spec.get("name", registry.DEFAULT)
    entry = registry.lookup(name, spec.get("module"))
    params = {key: spec[key] for key in entry.keys if key in spec}
    crisp.configure(encoder, sparsifier=name, apply_in_eval=spec.get("apply_in_eval", entry.apply_in_eval),
                    track_stats=False, **params)
    return {**entry.defaults(), **params}
