"""The Hydra entry point: ``python -m crisp.run [overrides]`` (one run) or ``-m`` (a grid).

Each run goes through the one run lifecycle (:mod:`crisp.core.lifecycle`): claimed, skipped if it
completed already with the same run_key, trained, and recorded in its results.json, also when it
fails. In a sweep a failing run is recorded and the sweep goes on; alone, it exits non-zero: 2 with
one clear line for an error the user can fix, 1 with the traceback for anything else. Every config error,
Hydra's own included, is one line and exit code 2 (:func:`main`).

Heavy imports (torch, transformers, Lightning) wait until a run trains: a config error is answered
within a second or two (crisp's Hydra callback checks a single run's values before anything is
written; its sweeper checks every job of a grid).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from crisp.core import lifecycle, results
from crisp.core.config import (
    CONF_DIR,
    register_configs,
    register_resolvers,
    resolved_config,
    scan_plugins,
    written_config,
)
from crisp.core.errors import USER_ERRORS
from crisp.core.objective import RunResult, run_result
from crisp.sweep.jobs import primary_metric
from crisp.training.ddp import is_child_rank

log = logging.getLogger("crisp")
register_configs()
register_resolvers()


def run(cfg: DictConfig) -> RunResult:
    """Run one configuration; returns what was written to results.json (or the skip record), which is also, as
    a float, the run's objective for a sweeper that optimises (:mod:`crisp.core.objective`)."""
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    from crisp.training.train import train  # heavy imports only for runs that train

    if is_child_rank():  # a DDP rank > 0: train alongside rank 0, which writes the results
        train(cfg, resolved_config(cfg), output_dir)
        return {"status": "ddp-rank"}
    config, written = resolved_config(cfg), written_config(cfg)
    base = Path(hydra_cfg.sweep.dir) if in_sweep else None
    record = results.run_record(config, output_dir, list(hydra_cfg.overrides.task), base, written)
    if (metric := primary_metric(config)) is not None:
        record["metric"] = metric  # a run that fails before it trains still says which metric its table compares
    one = lifecycle.Run.of(record, output_dir)
    sweep_id = base.name if base is not None else None

    def train_one(todo: list[lifecycle.Run]) -> None:
        todo[0].complete(train(cfg, config, output_dir, written=written, sweep_id=sweep_id))

    try:
        [payload] = lifecycle.attempt([one], train_one)
    finally:
        gc.collect()
    error = payload.get("error") or {}
    if payload["status"] == results.FAILED and not in_sweep:
        if error.get("type") in {e.__name__ for e in USER_ERRORS}:
            print(f"crisp: error: {error['message']}", file=sys.stderr)  # one clear line; details in results.json
            sys.exit(2)
        sys.exit(1)  # its traceback is logged above
    return run_result(payload, output_dir, cfg.get("objective", "final"))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> dict[str, Any]:
    return run(cfg)  # launchers that run jobs elsewhere hand this back to the sweep


def main() -> None:
    """Hydra's main, with every config error as crisp says its own: one line, exit code 2. Hydra's own (an
    unknown key, a choice that does not exist, a value of the wrong type) it would print in several lines
    and exit 1; with ``HYDRA_FULL_ERROR=1`` it raises them here instead (set by the user: the trace too)."""
    trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        scan_plugins()  # hydra/sweeper=optuna with crisp's defaults (it maximises the runs' objective)
        _hydra_main()
    except Exception as err:
        from crisp.sweep.config_errors import is_user_error, one_line

        if not is_user_error(err):
            raise  # a bug, not a config: the traceback, exit 1
        if trace:
            traceback.print_exc()
        print(f"crisp: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
