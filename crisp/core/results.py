"""The per-run results file: ``results.json`` in the run's output directory.

It is the only thing the report reads. Written atomically (temp file + rename), so a reader sees
either the previous file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crisp.core.data_config import task_name, without_preset_declaration
from crisp.sparsity import registry

FILENAME = "results.json"
SCHEMA_VERSION = 1
COMPLETED, FAILED = "completed", "failed"

# Keys that say where or how a run is watched, not what it computes: they stay out of the run_key.
NOT_IN_KEY = ("hydra", "logger", "paths", "report", "sweep", "objective")
# trainer keys added after runs were recorded, at the values that leave a run as it was: out of the key
TRAINER_DEFAULTS = {"accumulate_grad_batches": 1, "gradient_clip_val": None, "val_check_interval": None}
# trainer keys that say when a run keeps its checkpoint, never what it computes: a run resumed with another
# checkpoint interval is the same run
TRAINER_NOT_IN_KEY = ("checkpoint_every_n_steps", "checkpoint_every_n_epochs", "keep_checkpoint")


def effective_strategy(strategy: str, sparsity: float, sparsifier: dict[str, Any] | None = None) -> str:
    """``sparsity=0`` is dense whatever the strategy; a sparsifier that takes no sparsity (entmax) has none."""
    if not uses_sparsity(sparsifier):
        return "none"
    return "dense" if sparsity == 0 else strategy


def _without_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A config hashes as it did before crisp had the keys it leaves at their defaults (dropout left to the
    model, the topk sparsifier, a GLUE task declared as its preset declares it, no callbacks, Lightning's own
    accumulation, clipping and validation interval) or that never change a run (when it checkpoints): runs
    recorded then still resume and pair with runs recorded now."""
    dropout = config.get("dropout")
    if isinstance(dropout, dict) and all(v is None for v in dropout.values()):
        config = {k: v for k, v in config.items() if k != "dropout"}
    sparsifier = config.get("sparsifier")
    if isinstance(sparsifier, dict) and sparsifier.get("name") == registry.DEFAULT:
        config = {**config, "sparsifier": {k: v for k, v in sparsifier.items() if k != "name"}}
    if isinstance(config.get("data"), dict):
        config = {**config, "data": without_preset_declaration(config["data"])}
    if "callbacks" in config and not config["callbacks"]:
        config = {k: v for k, v in config.items() if k != "callbacks"}
    trainer = config.get("trainer")
    if isinstance(trainer, dict):
        trainer = {k: v for k, v in trainer.items() if k not in TRAINER_NOT_IN_KEY
                   and not (k in TRAINER_DEFAULTS and v == TRAINER_DEFAULTS[k])}
        config = {**config, "trainer": trainer}
    return config


def _dense_sparsifier(sparsifier: Any) -> Any:
    """At sparsity 0 every sparsifier that uses sparsity is the same dense run: it hashes as topk's
    (which applies in evaluation by default), keeping only how often statistics are taken."""
    if not isinstance(sparsifier, dict) or sparsifier.get("name", registry.DEFAULT) == registry.DEFAULT:
        return sparsifier
    entry = registry.SPARSIFIERS.get(sparsifier["name"])
    if entry is None or not entry.uses_sparsity:
        return sparsifier
    return {"apply_in_eval": True, "stats_every_n_steps": sparsifier.get("stats_every_n_steps")}


def run_key(config: dict[str, Any]) -> str:
    """Stable hash of the effective config (without output paths, logging, or the strategy and sparsifier of a
    dense run)."""
    keyed = {k: v for k, v in _without_defaults(config).items() if k not in NOT_IN_KEY}
    if isinstance(keyed.get("model"), dict):
        keyed["model"] = {k: v for k, v in keyed["model"].items() if k != "label"}  # a display name
    if keyed.get("sparsity") == 0 and isinstance(keyed.get("strategy"), dict):
        keyed["strategy"] = {"name": "dense"}
    if keyed.get("sparsity") == 0 and "sparsifier" in keyed:
        keyed["sparsifier"] = _dense_sparsifier(keyed["sparsifier"])
    blob = json.dumps(keyed, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# What a run varies within a study: runs of one recipe differ in these alone, and the report pools them into
# one table, a row per configuration. The sparsifier and the dropout probabilities are part of a row's
# configuration too (a control beside top-k, attention dropout beside sparsity): recipe_key sets them aside.
VARIES_WITHIN_STUDY = ("seed", "sparsity", "strategy", "name", "tags")


def _recipe_sparsifier(sparsifier: Any) -> Any:
    """The part of the sparsifier a recipe holds: how often statistics are taken. ``apply_in_eval: true``
    stays in it, so that topk runs recorded before sparsifiers had a group keep their recipe."""
    if not isinstance(sparsifier, dict):
        return sparsifier
    return {"apply_in_eval": True, "stats_every_n_steps": sparsifier.get("stats_every_n_steps", 50)}


def recipe_key(unresolved: dict[str, Any]) -> str:
    """Hash of the config as written, before interpolation, without what a run varies or how it is watched:
    runs of one recipe differ in seed, sparsity, strategy, sparsifier and dropout alone (a value derived from
    the seed, such as ``data_seed: ${seed}``, stays one recipe; a folder found through an environment variable
    is one folder)."""
    kept = {k: v for k, v in _without_defaults(unresolved).items()
            if k not in (*NOT_IN_KEY, *VARIES_WITHIN_STUDY, "dropout")}
    if "sparsifier" in kept:
        kept["sparsifier"] = _recipe_sparsifier(kept["sparsifier"])
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sparsifier_label(sparsifier: dict[str, Any] | None) -> str:
    """How tables name a run's sparsifier: ``topk``, ``random``, ``entmax alpha=1.5``, with
    ``apply_in_eval`` named where it is not the choice's default (results before sparsifiers had a group: topk)."""
    sparsifier = sparsifier or {}
    name = sparsifier.get("name", registry.DEFAULT)
    entry = registry.SPARSIFIERS.get(name)
    parts = [name]
    if entry is not None:
        parts += [f"{key}={sparsifier.get(key, spec.default):g}" for key, spec in entry.keys.items()]
        if sparsifier.get("apply_in_eval", entry.apply_in_eval) != entry.apply_in_eval:
            parts.append(f"apply_in_eval={str(sparsifier['apply_in_eval']).lower()}")
    return " ".join(parts)


def uses_sparsity(sparsifier: dict[str, Any] | None) -> bool:
    entry = registry.SPARSIFIERS.get((sparsifier or {}).get("name", registry.DEFAULT))
    return entry is None or entry.uses_sparsity


def model_label(model: dict[str, Any]) -> str:
    """How results and reports name a model: portable, never a machine's path.

    The model yaml's ``label`` if it sets one (``sentence-transformers/all-MiniLM-L6-v2`` for the
    folder the PyPI package installs), else a hub name as given, a local folder by its name, or
    ``random-init <type>`` for models built from a config.
    """
    if model.get("label"):
        return str(model["label"])
    name = model.get("name_or_path")
    if not name:
        return f"random-init {(model.get('from_config') or {}).get('model_type', 'model')}"
    return Path(name).name if Path(name).is_absolute() or Path(name).expanduser().is_dir() else str(name)


def trained_model(class_name: str, name_or_path: str | None) -> dict[str, str | None]:
    """What results.json names as the model that trained (``trained_model``): its class, where its weights came
    from (a hub name as given, a local folder by its last two parts: never a machine's path) or None for a
    random init, and a label that says both (``RobertaForSequenceClassification from runs/roberta``, ``random
    init, DistilBertForSequenceClassification``). Unlike ``model``, the config's display name, it is read off
    the model that was built."""
    source = None
    if name_or_path:
        path = Path(name_or_path).expanduser()
        source = "/".join(path.resolve().parts[-2:]) if path.is_absolute() or path.is_dir() else str(name_or_path)
    label = f"{class_name} from {source}" if source else f"random init, {class_name}"
    return {"class": class_name, "name_or_path": source, "label": label}


def portable_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """``path`` as results record it: relative to ``base`` (or the working directory) when inside it,
    else only its last part after ``.../``: never a machine's absolute path."""
    resolved = Path(path).expanduser().resolve()
    for root in (base, os.getcwd()):
        if root is not None and resolved.is_relative_to(Path(root).resolve()):
            return str(resolved.relative_to(Path(root).resolve())) or "."
    return f".../{resolved.name}"


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as results.json records it: the model by its hub name where its yaml gives one (a
    packaged copy's folder is a machine's), folders portably (:func:`portable_path`)."""
    config = json.loads(json.dumps(config, default=str))
    model, data = config.get("model") or {}, config.get("data") or {}
    if model.get("name_or_path") and (model.get("label") or Path(str(model["name_or_path"])).is_absolute()):
        model["name_or_path"] = model_label(model)
    for section, key in ((model, "tokenizer"), (data, "dir"), (data, "train_file"), (data, "path"), (data, "hub_path")):
        value = section.get(key)
        if isinstance(value, str) and value not in ("train",) and _a_local_path(value, key):
            section[key] = portable_path(value)
    if isinstance(data.get("validation_file"), list):
        data["validation_file"] = [portable_path(v) if isinstance(v, str) else v for v in data["validation_file"]]
    elif isinstance(data.get("validation_file"), str):
        data["validation_file"] = portable_path(data["validation_file"])
    return config


def _a_local_path(value: str, key: str) -> bool:
    if key == "hub_path":  # a hub name (org/dataset) is no path
        return value.startswith(("/", ".", "~")) or Path(value).expanduser().is_dir()
    return "/" in value or Path(value).expanduser().exists()


def run_record(config: dict[str, Any], output_dir: Path, overrides: list[str], base: Path | None = None,
               unresolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every results.json of this run starts with, whatever happens to the run.

    The run_key is the hash of the config as it ran (:func:`run_key`), the recipe that of the config as
    written (:func:`recipe_key`, from ``unresolved``); the config is recorded portably, the output
    directory relative to ``base`` (the sweep's directory)."""
    return {
        "schema": SCHEMA_VERSION,
        "output_dir": portable_path(output_dir, base),
        "run_key": run_key(config),
        "recipe": recipe_key(unresolved if unresolved is not None else config),
        "name": config["name"],
        "strategy": effective_strategy(config["strategy"]["name"], config["sparsity"], config.get("sparsifier")),
        "sparsifier": sparsifier_label(config.get("sparsifier")),
        "dropout": {k: v for k, v in (config.get("dropout") or {}).items() if v is not None},
        "sparsity": config["sparsity"],
        "seed": config["seed"],
        "model": model_label(config["model"]),
        "data": config["data"]["name"],
        "task": task_name(config["data"]),
        "config": portable_config(config),
        "overrides": list(overrides),
    }


def record_failure(output_dir: Path, record: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """Write ``record`` as failed with ``error`` (type, message, traceback), unless the run already completed."""
    payload = {**record, "status": FAILED, "error": error}
    payload.setdefault("finished_at", now())
    if (read(output_dir) or {}).get("status") != COMPLETED:
        write_atomic(Path(output_dir) / FILENAME, payload)
    return payload


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, payload: dict[str, Any] | bytes) -> None:
    """Write JSON (or bytes) to ``path`` through a temp file and a rename, with the mode of any new
    file (0644 under the usual umask; a temp file's own would be 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            if isinstance(payload, bytes):
                f.write(payload)
            else:
                f.write((json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: Path) -> dict[str, Any] | None:
    """The results in ``path`` (a file or a run directory), or None if there are none or they are unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def unreadable(run_dir: Path) -> str | None:
    """Why the results.json in ``run_dir`` cannot be read, or None when it reads (or there is none)."""
    path = Path(run_dir) / FILENAME
    if not path.exists():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None if isinstance(found, dict) else "it is not a JSON object"


def is_completed(run_dir: Path, key: str) -> bool:
    """True when ``run_dir`` already holds a completed run with this run_key (so a resumed sweep skips it)."""
    found = read(run_dir)
    return bool(found) and found.get("status") == COMPLETED and found.get("run_key") == key


def find_all(*dirs: Path) -> list[Path]:
    """Every results.json below ``dirs``, sorted."""
    return sorted({p for d in dirs for p in Path(d).rglob(FILENAME)})
