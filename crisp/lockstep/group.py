"""Train a group of runs in lockstep, in this process: every run set up as it would be alone.

For each run, in order: its directory and ``.hydra/`` as Hydra makes them; its config checked (a bad
value fails that run only); skipped if already completed (resume); claimed with its run lock. Then,
exactly as :func:`crisp.train.train` does for one run: the seed, the data, the tokenizer, the seed
again, the model's initialisation, the strategy (adaptive calibration on its own dense model). Then
the runs' models are fused (:mod:`crisp.lockstep.fused`) and trained together, and each run gets
its own results.json (same schema and run_key as alone), logger and statistics.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.utils import JobReturn, run_job
from hydra.types import HydraContext
from lightning_fabric.plugins.environments import LightningEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import TQDMProgressBar

import crisp
from crisp import loggers, results
from crisp.config import ConfigError, resolved_config, validate
from crisp.data import _round_up, calibration_batches, load_splits, tokenize
from crisp.encoder import build_encoder, build_tokenizer
from crisp.hub import resolve_model
from crisp.lockstep.data import GroupDataModule
from crisp.lockstep.dropout import RunRandom
from crisp.lockstep.fused import fuse, run_state_dict
from crisp.lockstep.model import LockstepClassifier, Run
from crisp.run import failure
from crisp.strategies import STRATEGIES, measure_entropy
from crisp.sweep import heartbeat
from crisp.sweep.jobs import Job, job_return, map_forked
from crisp.sweep.lock import RunLock, RunLockBusy
from crisp.train import Progress, environment, epochs_summary, save_weights, trainer_settings

log = logging.getLogger("crisp")


@dataclass
class Member:
    """One run of the group while it is being set up."""

    job: Job
    cfg: DictConfig  # the run's config, without Hydra's section
    config: dict[str, Any]
    started: str
    result: dict[str, Any] | None = None  # set once the run is skipped, failed or completed
    run: Run | None = None
    train: Any = None
    val: Any = None
    encoder: torch.nn.Module | None = None
    calibration_entropy: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        return self.job.output_dir

    def fail(self, err: BaseException) -> None:
        self.result = results.record_failure(self.output_dir, {**self.job.record, "started_at": self.started},
                                             failure(err))
        log.error("%s failed: %s: %s", self.job.name, type(err).__name__, err)


def run_group(hydra_context: HydraContext, jobs: list[Job], options: dict[str, Any]) -> list[JobReturn]:
    members = map_forked(lambda job: _prepare(hydra_context, job), jobs)  # Hydra's run_job: pure Python
    with ExitStack() as claims:
        for m in members:
            if m.result is None:
                try:
                    claims.enter_context(RunLock(m.output_dir))
                except RunLockBusy as busy:
                    m.result = {**m.job.record, "status": "skipped"}
                    log.info("%s: %s, skipped", m.job.name, busy)
        todo = [m for m in members if m.result is None]
        if todo:
            try:
                _train(todo, options)
            except Exception as err:  # the group as a whole failed: every run it had not finished
                for m in todo:
                    if m.result is None:
                        m.fail(err)
                if not isinstance(err, ConfigError):
                    log.exception("lockstep group failed")
    return [job_return(m.job, m.result) for m in members]


def _prepare(hydra_context: HydraContext, job: Job) -> Member:
    # the run's directory, .hydra/ and config, as Hydra makes them for a job (no job logging:
    # the group's output is its worker's log)
    ret = run_job(hydra_context=hydra_context, task_function=lambda cfg: cfg, config=job.config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir", configure_logging=False)
    cfg = ret.return_value
    member = Member(job, cfg, resolved_config(cfg), results.now())
    try:
        validate(cfg)
    except ConfigError as err:
        member.fail(err)
        return member
    if results.is_completed(job.output_dir, job.record["run_key"]):
        log.info("%s: already completed in %s, skipped", job.name, job.output_dir)
        member.result = {**job.record, "status": "skipped"}
    return member


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _train(members: list[Member], options: dict[str, Any]) -> None:
    cfg = members[0].cfg  # the group's shared recipe (crisp.sweep.lockstep groups by it)
    settings = trainer_settings(cfg)
    if cfg.model.name_or_path:
        resolve_model(cfg.model.name_or_path)  # an unreachable hub fails now, not after the data
    device = torch.device("cuda" if settings["accelerator"] == "gpu" else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
    _build_runs(members, device)
    width = max(options.get("row_width", 64), _round_up(max(int(s.lengths.max()) for m in members
                                                             for s in (m.train, m.val)), 16))
    random = RunRandom([m.cfg.seed for m in members], device)
    # every token id the runs' training batches can hold (0 pads packed rows)
    splits = {id(m.train): m.train for m in members}.values()
    trained_tokens = torch.cat([torch.zeros(1, dtype=torch.long), *(s.input_ids.flatten() for s in splits)]).unique()
    encoder = fuse([m.encoder for m in members], random, trained_tokens).to(device)
    for m in members:
        m.encoder = None  # fused now: the single models' tensors can go
    workers = options.get("pack_workers", "auto")
    datamodule = GroupDataModule([m.train for m in members], [m.val for m in members], [m.cfg.seed for m in members],
                                 cfg.data.batch_size, cfg.data.eval_batch_size, width,
                                 pin_memory=device.type == "cuda",
                                 workers=(2 if device.type == "cuda" else 0) if workers == "auto" else workers)
    for m in members:
        m.run.logger = loggers.make_logger(m.cfg, m.config, m.output_dir) or None
    module = LockstepClassifier(encoder, [m.run for m in members], random, cfg, cuda_graphs=settings["cuda_graphs"],
                                on_failure=lambda run: _run_failed(members, run))
    progress = Progress()
    trainer = pl.Trainer(
        accelerator=settings["accelerator"], devices=1, precision=settings["precision"],
        max_epochs=cfg.trainer.max_epochs, logger=False,
        callbacks=[TQDMProgressBar(refresh_rate=settings["refresh"]), progress],
        plugins=[LightningEnvironment()], enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=cfg.trainer.deterministic, default_root_dir=str(members[0].output_dir),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    log.info("lockstep: training %d runs as one model (rows of %d tokens)", len(members), width)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        fit_seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise RuntimeError("training was interrupted")
    done = [m for m in members if m.result is None]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    seen = len(datamodule.train) * cfg.trainer.max_epochs
    group = {"runs": len(members), "completed": len(done), "row_width": width,
             "samples_per_second": round(seen * len(done) / progress.train_seconds, 1),
             "peak_gpu_memory_mb": None if peak is None else round(peak, 1)}
    for position, m in enumerate(done):
        if cfg.trainer.save_weights:
            save_weights(m.output_dir, run_state_dict(encoder, position))
        payload = {**m.job.record, "status": results.COMPLETED, "error": None, **_summary(
            m, seen, fit_seconds, progress.train_seconds, settings, module, group)}
        payload |= {"started_at": m.started, "finished_at": results.now()}
        results.write_atomic(m.output_dir / results.FILENAME, payload)
        m.result = payload
        log.info("%s: completed, results in %s", m.job.name, m.output_dir / results.FILENAME)


def _build_runs(members: list[Member], device: torch.device) -> None:
    """Each run's data, tokenizer, initial model and per-layer sparsity, as crisp.train makes them alone.

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
        init_key = (tok_key, cfg.seed)
        if init_key not in initial:
            pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the init depends on the seed only
            initial[init_key] = build_encoder(cfg.model, tokenizer).to(device).train()
        encoder = initial[init_key]
        for split in ("train", "validation"):
            if (tok_key, data_key, split) not in tokenized:
                tokenized[tok_key, data_key, split] = tokenize(tokenizer, splits[data_key][split], cfg.data.max_length)
        m.train, m.val = tokenized[tok_key, data_key, "train"], tokenized[tok_key, data_key, "validation"]
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
        print(f"crisp: {m.job.name}: strategy={name} sparsity={cfg.sparsity:g} -> per-layer sparsity [{allocation}]")
        m.encoder, m.run = encoder, Run(m.job.name, layer_sparsity)
        heartbeat.beat(force=True)


def _run_failed(members: list[Member], run: Run) -> None:
    member = next(m for m in members if m.run is run)
    member.fail(run.error)
    loggers.finish(run.logger)


def _summary(m: Member, seen: int, fit_seconds: float, train_seconds: float, settings: dict[str, Any],
             module: LockstepClassifier, group: dict[str, Any]) -> dict[str, Any]:
    run = m.run
    return {
        "layers": {
            "configured": run.layer_sparsity,
            "achieved": run.layers.get("train_achieved"),
            "achieved_val": run.layers.get("val_achieved"),
            "entropy": run.layers.get("val_entropy"),
            "entropy_train": run.layers.get("train_entropy"),
            "calibration_entropy": m.calibration_entropy,
        },
        **epochs_summary(run.history),
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
