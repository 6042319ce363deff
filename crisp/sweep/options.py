"""The settings of crisp's launchers (``hydra.launcher.*``), typed, and checked before anything starts.

Each launcher's yaml in ``conf/hydra/launcher/`` holds every setting and its one default; the dataclasses
here say what each setting is, and :func:`build` makes one from the launcher's config, once, when Hydra
builds the launcher (``hydra_plugins/crisp_launchers``). crisp's sweep callback builds the launcher before
anything is written or started (:class:`crisp.sweep.callback.SweepCallback`), so a value that is not
allowed stops the sweep there, as a :class:`~crisp.core.errors.ConfigError` that names the key, the value
and what is allowed (``stall_timeout_s=0`` would end every run at once as stalled; ``n_jobs=0``, an empty
pool). The launchers built on submitit pass submitit's settings on as they are, after the checks below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from omegaconf import OmegaConf

from crisp.core.errors import ConfigError
from crisp.lockstep.options import GroupOptions

WORKER_START = ("auto", "fork", "exec")


def _whole(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


# every checked setting: (whether a value is allowed, what is allowed)
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n_jobs": (_whole(1), "a whole number of runs at once >= 1"),
    "stall_timeout_s": (_positive, "a number of seconds > 0 (a worker silent this long is ended)"),
    "worker_start": (lambda v: v in WORKER_START, f"use one of {', '.join(WORKER_START)}"),
    "max_runs_per_group": (lambda v: v in ("auto", None) or _whole(1)(v),
                           "use auto, null (one group per recipe) or a number of runs >= 1"),
    "row_width": (_whole(1), "a whole number of tokens >= 1"),
    "pack_workers": (lambda v: v == "auto" or _whole(0)(v), "use auto or a number of processes >= 0"),
    "poll_s": (_positive, "a number of seconds > 0"),
    "timeout_min": (_positive, "a number of minutes > 0"),
    "max_num_timeout": (_whole(0), "a whole number of requeues >= 0"),
    "array_parallelism": (_whole(1), "a whole number of tasks at once >= 1"),
    "signal_delay_s": (_whole(0), "a whole number of seconds >= 0"),
    "tasks_per_node": (_whole(1), "a whole number >= 1"),
    "nodes": (_whole(1), "a whole number >= 1"),
    "cpus_per_task": (_or_null(_whole(1)), "null or a whole number >= 1"),
    "gpus_per_node": (_or_null(_whole(0)), "null or a whole number >= 0"),
    "gpus_per_task": (_or_null(_whole(0)), "null or a whole number >= 0"),
    "mem_gb": (_or_null(_positive), "null or a number of GB > 0"),
}


@dataclass(frozen=True)
class ParallelOptions:
    """``hydra/launcher=parallel``: one worker process per run, ``n_jobs`` at once."""

    n_jobs: int
    stall_timeout_s: float
    worker_start: str


@dataclass(frozen=True)
class LockstepOptions:
    """``hydra/launcher=lockstep`` and ``auto``: the runs of a recipe trained as one fused model per group."""

    max_runs_per_group: int | str | None
    row_width: int
    pack_workers: int | str
    stall_timeout_s: float
    worker_start: str

    @property
    def group(self) -> GroupOptions:
        return GroupOptions(self.row_width, self.pack_workers)


@dataclass(frozen=True)
class LocalOptions:
    """``hydra/launcher=local``: submitit's local mode, one process per run (crisp checks these of its settings)."""

    timeout_min: float
    tasks_per_node: int
    nodes: int
    cpus_per_task: int | None
    gpus_per_node: int | None
    mem_gb: float | None

    # submitit's local mode runs on this machine alone, and one process per run
    ALLOWED: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {
        "nodes": (lambda v: v == 1, "1: the local launcher runs on this machine"),
        "tasks_per_node": (lambda v: v == 1, "1: one process per run (each runs the whole run)"),
        "cpus_per_task": (lambda v: v is None, "null: submitit's local mode does not limit a run's CPUs"),
        "mem_gb": (lambda v: v is None, "null: submitit's local mode does not limit a run's memory"),
    }


@dataclass(frozen=True)
class SlurmOptions:
    """``hydra/launcher=slurm``: one SLURM job array per sweep (crisp's ``poll_s``, and submitit's settings
    that crisp checks)."""

    poll_s: float
    timeout_min: float
    max_num_timeout: int
    array_parallelism: int
    signal_delay_s: int
    tasks_per_node: int
    nodes: int
    cpus_per_task: int | None
    gpus_per_task: int | None
    mem_gb: float | None

    OWN: ClassVar[tuple[str, ...]] = ("poll_s",)  # crisp's, not submitit's


@dataclass(frozen=True)
class SlurmLockstepOptions(SlurmOptions):
    """``hydra/launcher=slurm_lockstep``: the array's tasks are lockstep groups."""

    max_runs_per_group: int | str | None
    row_width: int
    pack_workers: int | str

    OWN: ClassVar[tuple[str, ...]] = ("poll_s", "max_runs_per_group", "row_width", "pack_workers")

    @property
    def group(self) -> GroupOptions:
        return GroupOptions(self.row_width, self.pack_workers)


Options = TypeVar("Options")


def build(kind: type[Options], settings: Mapping[str, Any], *, others_allowed: bool = False) -> Options:
    """``kind`` from a launcher's settings (its yaml and the overrides), every value checked.

    A setting that ``kind`` does not name is refused, unless ``others_allowed`` (submitit's own
    settings, which Hydra's structured config checks, go on to submitit).
    """
    if OmegaConf.is_config(settings):
        settings = OmegaConf.to_container(settings, resolve=True)
    settings = {k: v for k, v in settings.items() if k not in ("_target_", "defaults")}
    names = [f.name for f in fields(kind)]
    unknown = sorted(set(settings) - set(names))
    if unknown and not others_allowed:
        raise ConfigError(f"hydra.launcher.{unknown[0]}={settings[unknown[0]]!r} is not allowed: it is not a setting "
                          f"of this launcher, whose settings are {', '.join(names)}")
    for name in names:
        if name not in settings:
            raise ConfigError(f"hydra.launcher.{name} is missing: this launcher's yaml in conf/hydra/launcher/ sets it")
        allowed, what = getattr(kind, "ALLOWED", {}).get(name) or CHECKS[name]
        if not allowed(settings[name]):
            raise ConfigError(f"hydra.launcher.{name}={settings[name]!r} is not allowed: {what}")
    return kind(**{name: settings[name] for name in names})


def submitit_params(kind: type, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings submitit takes: all of them but crisp's own (``kind.OWN``)."""
    return {k: v for k, v in settings.items() if k not in getattr(kind, "OWN", ())}


def from_yaml(name: str, kind: type[Options] = LockstepOptions, conf_dir: Path | None = None) -> Options:
    """A launcher's options as its yaml sets them (``conf/hydra/launcher/<name>.yaml``): what a group trained
    outside a sweep takes (``python -m crisp.bench step``)."""
    from crisp.core.config import CONF_DIR

    return build(kind, OmegaConf.load((conf_dir or CONF_DIR) / "hydra" / "launcher" / f"{name}.yaml"))
