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


def group_name(config: dict[str, Any]) -> str:
    """Seeds of one configuration share a group: the config without its seed, as a readable name + hash."""
    without_seed = {k: v for k, v in config.items() if k not in ("seed", "name")}
    digest = hashlib.sha256(json.dumps(run_key(without_seed)).encode()).hexdigest()[:6]
    name = config["name"].rsplit("_seed", 1)[0]
    return f"{name}-{digest}"


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


def make_logger(cfg, config: dict[str, Any], output_dir: Path) -> Logger | bool:
    kind = cfg.logger.name
    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(save_dir=str(output_dir), name="csv", version="")
    if kind != "wandb":
        raise ValueError(f"logger={kind!r} is not allowed: choose wandb, csv or none")
    mode, reason = wandb_mode(cfg.logger.mode)
    if reason:
        print(
            f"W&B: logging offline ({reason}). The run is kept in {output_dir}/wandb; "
            f"upload it later with: wandb sync {output_dir}/wandb/offline-run-*"
        )
    import wandb

    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, name=config["name"],
                     group=group_name(config), tags=list(config.get("tags") or []), job_type="train",
                     dir=str(output_dir), mode=mode, config=config, reinit="create_new")
    return WandbLogger(experiment=run)


def finish(logger: Logger | bool) -> dict[str, Any] | None:
    """Close the W&B run (always: the next crisp run in this process must get its own); its id and url."""
    if not isinstance(logger, WandbLogger):
        if logger:
            logger.finalize("success")
        return None
    run = logger.experiment
    info = {"id": run.id, "url": run.url, "mode": run.settings.mode}
    run.finish()
    return info
