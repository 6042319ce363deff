"""The start and end of a ``-m`` sweep, in one place and in a fixed order (a Hydra callback).

A single run's values are checked here too, before Hydra writes its directory (a grid's jobs are
checked by crisp's sweeper, :mod:`crisp.sweep.sweeper`).

Start: say where the sweep lives and how to resume it; with ``sweep.mps=true``, check that the
launcher runs jobs in worker processes and start a private MPS daemon. End, once the launcher has
returned (so its workers have exited): write and print the report, then stop the MPS daemon, then
exit non-zero if any run failed. One callback, because Hydra calls several callbacks' end hooks in
reverse order and skips the rest when one raises.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig

from crisp.core import results
from crisp.core.config import validate
from crisp.core.errors import USER_ERRORS, ConfigError
from crisp.core.lifecycle import check_space
from crisp.sweep import nvidia_mps as mps
from crisp.sweep.config_errors import is_user_error, one_line
from crisp.sweep.folders import check_writable

USER_ERROR_NAMES = {error.__name__ for error in USER_ERRORS}

log = logging.getLogger("crisp")

# launchers that run each job in a process of its own: MPS serves those processes, and a job run in
# the sweep's own process would make the sweep an MPS client that the daemon's quit waits for
PROCESS_LAUNCHERS = ("crisp_launchers.", "hydra_plugins.hydra_submitit_launcher.")
CRISP_LAUNCHERS = "hydra_plugins.crisp_launchers."


class SweepCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with _config_errors_exit_2():
            validate(config)
            if config.sweep.mps:
                raise ConfigError("sweep.mps=true is not allowed in a single run: it runs a -m sweep's runs under "
                                  "one NVIDIA MPS daemon (add -m, or leave it false)")
            check_writable(config.hydra.run.dir, f"hydra.run.dir={config.hydra.run.dir}")
            check_space(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra sets it only as a job starts; a sweep folder named by ${hydra:runtime.choices.model} needs it now
        # (without it this hook raised, which Hydra turns into a warning: no check, no MPS, for experiment=paper)
        HydraConfig.instance().set_config(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        with _config_errors_exit_2():
            launcher = str(config.hydra.launcher.get("_target_", ""))
            if launcher.startswith(CRISP_LAUNCHERS):
                # crisp's launchers check their settings as they are built (crisp.sweep.options): built here once
                # first, so that a setting that is not allowed stops the sweep before anything starts (MPS too)
                instantiate(config.hydra.launcher)
            if config.sweep.mps and not any(name in launcher for name in PROCESS_LAUNCHERS):
                raise ConfigError(f"sweep.mps=true is not allowed with the launcher {launcher}: MPS shares one GPU "
                                  "among runs in separate processes; use hydra/launcher=lockstep or "
                                  "hydra/launcher=parallel")
        log.info("sweep directory: %s (to resume, run the same command with hydra.sweep.dir=%s)", sweep_dir, sweep_dir)
        if config.sweep.mps:
            try:
                mps.start()
            except mps.MPSError as error:
                # Hydra turns a callback's exceptions into warnings; the sweep must not start without it
                raise SystemExit(f"crisp: {error}") from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            failed = write_report(config, sweep_dir)
        finally:
            if config.sweep.mps:
                mps.stop()
        if failed:
            names = ", ".join(sorted(r.get("output_dir") or r.get("name", "?") for r in failed))
            message = f"crisp: {len(failed)} run(s) failed: {names} (see {sweep_dir}/report.md)"
            errors = [r.get("error") or {} for r in failed]
            if all(e.get("type") in USER_ERROR_NAMES for e in errors):
                # the data or the config, not crisp, stopped them (a bad row fails every run that reads it): exit 2
                # as a single run does, with its one line
                for line in dict.fromkeys(f"crisp: error: {e.get('message')}" for e in errors):
                    print(line, file=sys.stderr)
                print(message, file=sys.stderr, flush=True)
                raise SystemExit(2)
            raise SystemExit(message)


def write_report(config: DictConfig, sweep_dir: Path) -> list[dict[str, Any]]:
    """Write and print the sweep's report; returns the records of the runs that did not complete (each names its
    folder in the sweep, ``output_dir``: the run's name after the keys that vary)."""
    records = [results.read(p) or {} for p in results.find_all(sweep_dir)]
    failed = [r for r in records if r.get("status") != results.COMPLETED]
    if config.report.after_sweep and records:
        from crisp.report import format_all
        from crisp.report import write_report as write

        summary = write([sweep_dir], log_wandb=_wandb_target(config))
        print(format_all(summary), flush=True)
        log.info("report: %s (table, plot: report.png, numbers: report.csv)", sweep_dir / "report.md")
    from crisp.sweep import optimise

    if optimise.optimises(config) and (best := optimise.best_trial(config, sweep_dir)):
        log.info("%s", best)
    return failed


def _wandb_target(config: DictConfig) -> dict[str, Any] | None:
    if config.logger.name != "wandb":
        return None
    from crisp.training.loggers import sweep_tag, wandb_mode

    mode, _ = wandb_mode(config.logger.mode)
    sweep_id = Path(config.hydra.sweep.dir).name  # as every run of the sweep carries it (crisp.training.loggers)
    return {"project": config.logger.project, "entity": config.logger.entity, "mode": mode,
            "group": sweep_id, "dir": str(config.hydra.sweep.dir), "tags": [sweep_tag(sweep_id)],
            "config": {"sweep_id": sweep_id}, "name": f"report-{sweep_id}"}


@contextmanager
def _config_errors_exit_2() -> Iterator[None]:
    """A config error (crisp's, Hydra's or OmegaConf's) as one line and exit code 2: Hydra would turn a
    callback's exception into a warning and go on."""
    try:
        yield
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"crisp: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
