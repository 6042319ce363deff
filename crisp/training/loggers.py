"""Experiment loggers: Weights & Biases (default), CSV, or none.

W&B goes offline by itself when there is no API key or the service cannot be reached, and says how
to upload the run later. Every crisp run is its own W&B run (finished in :func:`finish`), also when
a lockstep group trains many runs in one process: each then gets a run of its own
(``wandb.init(reinit="create_new")``), passed to Lightning's logger, instead of the process's one.
"""

from __future__ import annotations

import hashlib
import json
import netrc
import os
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from crisp.core.errors import ConfigError
from crisp.core.results import run_key
from crisp.training.hub import reachable

WANDB_HOST = "api.wandb.ai"
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")  # what wandb's settings take


def group_name(config: dict[str, Any], written: dict[str, Any] | None = None) -> str:
    """Seeds of one configuration share a group: the config without its seed and what follows from it, as a
    readable name + hash. The hash is of the config as written (``written``), before interpolation, so that
    a value derived from the seed (``data.data_seed: ${seed}``) does not split the seeds apart."""
    source = written if written is not None else config
    without_seed = {k: v for k, v in source.items() if k not in ("seed", "name", "tags")}
    digest = hashlib.sha256(json.dumps(run_key(without_seed)).encode()).hexdigest()[:6]
    name = config["name"].rsplit("_seed", 1)[0]
    return f"{name}-{digest}"


def sweep_tag(sweep_id: str) -> str:
    """The tag every W&B run of a sweep carries, its report's run too (W&B tags are at most 64 characters)."""
    return f"sweep:{sweep_id}"[:64]


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _env_mode() -> str | None:
    """``$WANDB_MODE``, checked: set but empty is taken as unset (wandb itself fails on it with a validation error
    that never names the variable); a value wandb does not know is a ConfigError that names it."""
    mode = os.environ.get("WANDB_MODE")
    if mode == "":
        del os.environ["WANDB_MODE"]  # so that wandb does not read it either
        return None
    if mode is not None and mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={mode!r} is not allowed: use one of {', '.join(WANDB_MODES)}, or leave it unset")
    return mode


def wandb_mode(requested: str) -> tuple[str, str | None]:
    """(mode, reason when it had to fall back to offline)."""
    env = _env_mode()
    if requested != "auto":
        return requested, None
    if env:
        return env, None
    if not _has_api_key():
        return "offline", "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    if not reachable(WANDB_HOST):
        return "offline", f"{WANDB_HOST} cannot be reached"
    return "online", None


def make_logger(cfg, config: dict[str, Any], output_dir: Path, *, written: dict[str, Any] | None = None,
                sweep_id: str | None = None, resume: dict[str, Any] | None = None) -> Logger | bool:
    """The run's logger. ``written``: the config as written (its W&B group); ``sweep_id``: the sweep it is
    part of (a tag and a config key of its W&B run); ``resume``: the run resumes from a checkpoint, whose
    ``wandb_id`` and ``global_step`` say which W&B run goes on and which CSV rows stay."""
    kind = cfg.logger.name
    if kind == "none":
        return False
    if kind == "csv":
        logger = CSVLogger(save_dir=str(output_dir), name="csv", version="")
        if resume is not None:
            _keep_csv_rows(logger, resume["global_step"])
        return logger
    if kind != "wandb":
        raise ValueError(f"logger={kind!r} is not allowed: choose wandb, csv or none")
    mode, reason = wandb_mode(cfg.logger.mode)
    if reason:
        print(
            f"W&B: logging offline ({reason}). The run is kept in {output_dir}/wandb; "
            f"upload it later with: wandb sync {output_dir}/wandb/offline-run-*"
        )
    import wandb

    tags = list(config.get("tags") or []) + ([sweep_tag(sweep_id)] if sweep_id else [])
    resumed = {"id": resume["wandb_id"], "resume": "allow"} if resume and resume.get("wandb_id") else {}
    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, name=config["name"],
                     group=group_name(config, written), tags=tags, job_type="train", dir=str(output_dir), mode=mode,
                     config={**config, "sweep_id": sweep_id}, reinit="create_new", **resumed)
    return WandbLogger(experiment=run)


def wandb_id(logger: Logger | bool) -> str | None:
    """The id of the logger's W&B run (a resumed run's W&B run goes on), or None."""
    return logger.experiment.id if isinstance(logger, WandbLogger) else None


def finish(logger: Logger | bool, outcome: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Close the W&B run (always: the next crisp run in this process must get its own); its id and url.
    With the run's ``outcome`` (crisp.training.outcome.run_outcome), its summary holds the final epoch's
    numbers and the best epoch's (``final/val_acc``, ``best/val_acc``, ``best/epoch``, ...), not only the
    last values logged."""
    if not isinstance(logger, WandbLogger):
        if logger:
            logger.finalize("success")
        return None
    run = logger.experiment
    if outcome is not None:
        run.summary.update({f"{part}/{k}": v for part in ("final", "best") for k, v in outcome[part].items()})
    info = {"id": run.id, "url": run.url, "mode": run.settings.mode}
    run.finish()
    return info


def _keep_csv_rows(logger: CSVLogger, before_step: int) -> None:
    """A resumed run's metrics.csv keeps its rows from before the checkpoint (Lightning's CSV writer would
    delete the file): read them, let the writer start, and hand them to it to write first."""
    import csv

    path = Path(logger.log_dir) / "metrics.csv"
    rows = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    kept = [row for row in rows if int(float(row.get("step", 0))) < before_step]
    writer = logger.experiment  # deletes the old file
    writer.metrics = kept + writer.metrics
    writer.metrics_keys = sorted({k for row in kept for k in row} | set(writer.metrics_keys))
