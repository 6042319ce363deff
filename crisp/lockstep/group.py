"""Train a group of runs in lockstep, in this process: every run set up as it would be alone.

:func:`train_group` puts the group through the one run lifecycle (:func:`crisp.core.lifecycle.attempt`:
claim, skip what completed, train, record), as a single run goes through it. To train, for each run
and exactly as :func:`crisp.training.train.train` does for one: the seed, the data, the tokenizer, the
seed again, the model's initialisation, the strategy (adaptive calibration on its own dense model).
Then the runs' models are fused (:mod:`crisp.lockstep.fused`) and trained together, and each run gets
its own results.json (same schema and run_key as alone), logger and statistics.
"""

from __future__ import annotations

import json
import logging
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import LightningEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.strategies import SingleDeviceStrategy

import crisp
from crisp.core import heartbeat, lifecycle
from crisp.core.config import resolved_config
from crisp.core.errors import ConfigError
from crisp.lockstep.batches import GroupDataModule
from crisp.lockstep.dropout import RunRandom
from crisp.lockstep.fused import fuse, run_state_dict
from crisp.lockstep.fused_classifier import LockstepClassifier, Run
from crisp.lockstep.options import GroupOptions
from crisp.lockstep.run_adamw import RunOptim
from crisp.sparsity.families import FAMILIES, REGISTRY, family_of
from crisp.sparsity.strategies import STRATEGIES, measure_entropy
from crisp.training import loggers
from crisp.training.data import TokenizedSplit, calibration_batches, load_splits, round_up, tokenize
from crisp.training.encoder import build_encoder, build_tokenizer
from crisp.training.hub import resolve_model
from crisp.training.tasks import Task, task_of
from crisp.training.train import (
    Progress,
    environment,
    epochs_summary,
    layers_summary,
    save_weights,
    timed_fit,
    trainer_settings,
)

log = logging.getLogger("crisp")


@dataclass
class Member:
    """One run of the group while it is set up and trained."""

    run: lifecycle.Run
    cfg: DictConfig  # the run's config, without Hydra's section
    train: TokenizedSplit | None = None
    vals: list[TokenizedSplit] | None = None
    encoder: torch.nn.Module | None = None
    calibration_entropy: list[float] | None = None
    fused: Run | None = None  # the run as the fused module sees it

    @property
    def output_dir(self) -> Path:
        return self.run.output_dir


def train_group(runs: list[tuple[lifecycle.Run, DictConfig]], options: GroupOptions) -> list[dict[str, Any]]:
    """Every run of one recipe trained as one fused model; the outcome of each (see the module)."""
    members = [Member(run, cfg) for run, cfg in runs]
    by_run = {id(m.run): m for m in members}
    return lifecycle.attempt([m.run for m in members],
                             lambda todo: _train([by_run[id(run)] for run in todo], options))


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def run_optim(cfg: DictConfig) -> RunOptim:
    return RunOptim(float(cfg.optim.lr), float(cfg.optim.weight_decay), float(cfg.optim.warmup_ratio))


def _train(members: list[Member], options: GroupOptions) -> None:
    # runs of equal optimizer settings side by side: each set is one slice of the fused parameters (RunAdamW)
    members = sorted(members, key=lambda m: astuple(run_optim(m.cfg)))
    cfg = members[0].cfg  # the group's shared recipe (the launcher groups jobs by it), but for what runs vary
    settings = trainer_settings(cfg)
    if cfg.model.name_or_path:
        resolve_model(cfg.model.name_or_path)  # an unreachable hub fails now, not after the data
    gpu = settings["accelerator"] == "gpu"
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")  # with its index
    if device.type == "cuda":
        torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
    task = task_of(cfg.data)
    _build_runs(members, device, task)
    longest = max(int(s.lengths.max()) for m in members for s in (m.train, *m.vals))
    width = max(options.row_width, round_up(longest, 16))
    random = RunRandom([m.cfg.seed for m in members], device)
    # every token id the runs' training batches can hold (0 pads packed rows)
    splits = {id(m.train): m.train for m in members}.values()
    trained_tokens = torch.cat([torch.zeros(1, dtype=torch.long), *(s.input_ids.flatten() for s in splits)]).unique()
    encoder = fuse([m.encoder for m in members], random, trained_tokens,
                   projections=family_of(members[0].encoder).projections).to(device)
    for m in members:
        m.encoder = None  # fused now: the single models' tensors can go
    workers = options.pack_workers
    vals = [list(split) for split in zip(*(m.vals for m in members), strict=True)]  # per split, each run's
    datamodule = GroupDataModule([m.train for m in members], vals,
                                 [m.cfg.seed for m in members], cfg.data.batch_size, cfg.data.eval_batch_size, width,
                                 pin_memory=device.type == "cuda",
                                 workers=(2 if device.type == "cuda" else 0) if workers == "auto" else workers)
    for m in members:
        m.fused.logger = loggers.make_logger(m.cfg, resolved_config(m.cfg), m.output_dir) or None
    module = LockstepClassifier(encoder, [m.fused for m in members], random, cfg, task,
                                cuda_graphs=settings["cuda_graphs"], on_failure=lambda run: _run_failed(members, run))
    progress = Progress()
    trainer = pl.Trainer(
        accelerator=settings["accelerator"], devices=1, precision=settings["precision"],
        strategy=KeepOnDevice(device),
        max_epochs=cfg.trainer.max_epochs, logger=False,
        callbacks=[TQDMProgressBar(refresh_rate=settings["refresh"]), progress, *options.callbacks],
        plugins=[LightningEnvironment()], enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=cfg.trainer.deterministic, default_root_dir=str(members[0].output_dir),
    )
    log.info("lockstep: training %d runs as one model (rows of %d tokens)", len(members), width)
    fit_seconds = timed_fit(trainer, module, datamodule)
    if trainer.interrupted:
        raise RuntimeError("training was interrupted")
    done = [m for m in members if m.run.result is None]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    seen = len(datamodule.train) * cfg.trainer.max_epochs
    group = {"runs": len(members), "completed": len(done), "row_width": width,
             "samples_per_second": round(seen * len(done) / progress.train_seconds, 1),
             "peak_gpu_memory_mb": None if peak is None else round(peak, 1)}
    for position, m in enumerate(done):
        if cfg.trainer.save_weights:
            save_weights(m.output_dir, run_state_dict(encoder, position))
        m.run.complete(_summary(m, task, seen, fit_seconds, progress.train_seconds, settings, module, group))


class KeepOnDevice(SingleDeviceStrategy):
    """Lightning's one-device strategy, but its teardown leaves the model and the optimizer's state where
    they are: it copies them to the host (some 15 GB for 70 MiniLM runs, seconds of a grid's time)
    only for this process to free them; the runs' weights are saved from the device."""

    def teardown(self) -> None:
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def _build_runs(members: list[Member], device: torch.device, task: Task) -> None:
    """Each run's data, tokenizer, initial model and per-layer sparsity, as crisp.training.train makes them alone.

    A model's initialisation depends on its config and seed only, so the runs of one seed start from
    one model, built once (fuse stacks a copy for each); the adaptive runs of a seed share its
    calibration too (the dense model's entropy on the seed's calibration batches).
    """
    splits, tokenizers, tokenized, initial, entropies = {}, {}, {}, {}, {}
    for m in members:
        cfg = m.cfg
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        data_key = _key(OmegaConf.to_container(cfg.data, resolve=True))
        if data_key not in splits:
            splits[data_key] = load_splits(cfg.data)
        tok_key = _key([OmegaConf.to_container(cfg.model, resolve=True), data_key if cfg.model.tokenizer == "train"
                        else None])
        if tok_key not in tokenizers:
            tokenizers[tok_key] = build_tokenizer(cfg.model, splits[data_key]["train"].texts)
        tokenizer = tokenizers[tok_key]
        # the weights depend on the seed only; the dropout probabilities are the model's own too
        init_key = (tok_key, cfg.seed, _key(OmegaConf.to_container(cfg.dropout)))
        if init_key not in initial:
            pl.seed_everything(cfg.seed, workers=True, verbose=False)
            model = build_encoder(cfg.model, tokenizer, task, dropout=cfg.dropout)
            if family_of(model) is REGISTRY:
                raise ConfigError(f"{type(model).__name__} cannot train in lockstep, which fuses the encoder families "
                                  f"{', '.join(sorted(FAMILIES))}: train it with hydra/launcher=parallel")
            initial[init_key] = model.to(device).train()
        encoder = initial[init_key]
        token_types = family_of(encoder).token_types
        for split in splits[data_key]:
            if (tok_key, data_key, split) not in tokenized:
                tokenized[tok_key, data_key, split] = tokenize(tokenizer, splits[data_key][split], cfg.data.max_length,
                                                               token_types=token_types)
        names = [s for s in splits[data_key] if s != "train"]
        m.train, m.vals = tokenized[tok_key, data_key, "train"], [tokenized[tok_key, data_key, s] for s in names]
        strategy = OmegaConf.to_container(cfg.strategy, resolve=True)
        name, params = strategy.pop("name"), strategy
        if STRATEGIES[name].needs_entropy and cfg.sparsity > 0:
            calibration = (init_key, data_key, cfg.data.batch_size, cfg.data.calibration_batches)
            if calibration not in entropies:
                batches = calibration_batches(m.train, cfg.data.batch_size, cfg.data.calibration_batches, cfg.seed)
                entropies[calibration] = measure_entropy(encoder, batches)
            m.calibration_entropy = entropies[calibration]
        layer_sparsity = crisp.apply_strategy(encoder, name, cfg.sparsity, entropy=m.calibration_entropy, **params)
        crisp.configure(encoder, apply_in_eval=cfg.sparsifier.apply_in_eval, track_stats=False)
        allocation = ", ".join(f"{s:.3f}" for s in layer_sparsity)
        print(f"crisp: {m.run.name}: strategy={name} sparsity={cfg.sparsity:g} -> per-layer sparsity [{allocation}]")
        m.encoder, m.fused = encoder, Run(m.run.name, layer_sparsity, run_optim(cfg))
        heartbeat.beat(force=True)


def _run_failed(members: list[Member], run: Run) -> None:
    member = next(m for m in members if m.fused is run)
    member.run.fail(run.error)
    loggers.finish(run.logger)


def _summary(m: Member, task: Task, seen: int, fit_seconds: float, train_seconds: float, settings: dict[str, Any],
             module: LockstepClassifier, group: dict[str, Any]) -> dict[str, Any]:
    run = m.fused
    return {
        "layers": layers_summary(run.layer_sparsity, run.layers, m.calibration_entropy),
        **epochs_summary(run.history, task),
        "timing": {
            "fit_seconds": round(fit_seconds, 3),  # the group's
            "train_seconds": round(train_seconds, 3),
            "train_samples_per_second": round(seen / train_seconds, 1),  # this run's share of the group's time
            "train_examples": len(m.train),
            "peak_gpu_memory_mb": None if group["peak_gpu_memory_mb"] is None
            else round(group["peak_gpu_memory_mb"] / group["runs"], 1),
            "cuda_graphs": None if module.graphed_step is None else module.graphed_step.stats,
            "precision": settings["precision"],
            "lockstep": group,
        },
        "environment": environment(settings["accelerator"]),
        "wandb": loggers.finish(run.logger),
    }
