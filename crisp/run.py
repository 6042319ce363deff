"""The Hydra entry point: ``python -m crisp.run [overrides]`` (one run) or ``-m`` (a grid).

Each run writes ``results.json`` into its output directory, also when it fails. In a sweep a failing
run is recorded and the sweep goes on; a run already completed with the same run_key is skipped.
"""

from __future__ import annotations

import gc
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from crisp import results
from crisp.config import ConfigError, register_configs, register_resolvers, resolved_config
from crisp.data import DataError
from crisp.ddp import is_child_rank
from crisp.hub import HubUnreachableError
from crisp.sweep.lock import RunLock, RunLockBusy

log = logging.getLogger("crisp")
register_configs()
register_resolvers()

# errors whose message says everything: no traceback for these
USER_ERRORS = (ConfigError, DataError, HubUnreachableError)


def failure(err: BaseException) -> dict[str, str]:
    return {"type": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one configuration; returns what was written to results.json (or the skip record)."""
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    started = results.now()
    base: dict[str, Any] = {"schema": results.SCHEMA_VERSION, "output_dir": str(output_dir)}
    if is_child_rank():  # a DDP rank > 0: train alongside rank 0, which writes the results
        from crisp.train import train

        train(cfg, resolved_config(cfg), output_dir)
        return {"status": "ddp-rank"}
    try:
        config = resolved_config(cfg)
        base = results.run_record(config, output_dir, hydra_cfg.overrides.task)
        with RunLock(output_dir):
            # checked under the claim: a job sharing this run may have just finished it
            if results.is_completed(output_dir, base["run_key"]):
                log.info("%s: already completed in %s, skipped", config["name"], output_dir)
                return {**base, "status": "skipped"}
            from crisp.train import train  # heavy imports only for runs that train

            outcome = train(cfg, config, output_dir)
            payload = {**base, "status": results.COMPLETED, "error": None, **outcome}
            payload |= {"started_at": started, "finished_at": results.now()}
            results.write_atomic(output_dir / results.FILENAME, payload)
        log.info("%s: completed, results in %s", base["name"], output_dir / results.FILENAME)
        return payload
    except RunLockBusy as busy:
        log.info("%s: %s, skipped", base.get("name", output_dir.name), busy)
        return {**base, "status": "skipped"}
    except Exception as err:  # recorded, then raised (one run) or swallowed (a sweep goes on)
        payload = results.record_failure(output_dir, {**base, "started_at": started}, failure(err))
        log.error("%s failed: %s: %s", base.get("name", output_dir.name), type(err).__name__, err)
        if not in_sweep:
            if isinstance(err, USER_ERRORS):
                print(f"crisp: error: {err}", file=sys.stderr)  # one clear line; details in results.json
                sys.exit(2)
            raise
        if not isinstance(err, USER_ERRORS):
            log.error(payload["error"]["traceback"])
        return payload
    finally:
        gc.collect()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> dict[str, Any]:
    return run(cfg)  # launchers that run jobs elsewhere hand this back to the sweep


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()

