"""A lockstep group's checkpoint, kept per run: each run's ``checkpoints/last.ckpt`` holds that run alone.

Lightning saves the group as one checkpoint (the fused module, RunAdamW, the loops); :class:`GroupCheckpointIO`,
the group's checkpoint IO, writes it as one file per run instead, each in the run's own directory, as a
run alone keeps its checkpoint (:mod:`crisp.training.checkpoints`): the run's slice of every fused parameter
and of AdamW's moments (a fused tensor's first dimension is the run), its part of the module's state
(history, the epoch's running sums, its early stopping: ``crisp_runs``), and what the whole group shares
(the loops' position, the dropout streams' step, RunAdamW's step count). The word embeddings are kept as
the run's whole table (and moments): which rows a fused group trains depends on the group's data, so that
a run can resume in another group (some runs completed, or left). Loading does the reverse for the runs
that resume together, all from one position (:func:`positions` tells them apart), into the new group's
layout, and hands Lightning one checkpoint of the group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO

from crisp.lockstep.fused import FusedEmbedding, solo_ndim
from crisp.training import checkpoints as run_checkpoints

GROUP_KEYS = ("state_dict", "optimizer_states", "crisp_runs")


def parameter_names(module) -> list[str]:
    """The module's parameters in the order RunAdamW holds them (decayed, then not: configure_optimizers)."""
    named = list(module.named_parameters())
    return [n for n, p in named if solo_ndim(p) >= 2] + [n for n, p in named if solo_ndim(p) < 2]


def _tables(module) -> dict[str, FusedEmbedding]:
    """The fused embeddings that train some rows only, by their name in the module's state_dict."""
    return {name: m for name, m in module.named_modules() if isinstance(m, FusedEmbedding) and m.frozen is not None}


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().clone()  # a copy of the slice alone, not the storage it views


def split(module, checkpoint: dict[str, Any], run: int) -> dict[str, Any]:
    """Run ``run``'s own checkpoint out of the group's (see the module)."""
    tables = _tables(module)
    per_run = {n for n, _ in module.named_parameters()} | {f"{t}.{b}" for t in tables for b in ("frozen", "decay")}
    state = {}
    for key, value in checkpoint["state_dict"].items():
        table = key.rpartition(".")[0]
        if table in tables:
            continue
        state[key] = _cpu(value[run]) if key in per_run else value
    for name, m in tables.items():
        state[f"{name}.table"] = _cpu(m.solo("weight", run))
    optimizer = checkpoint["optimizer_states"][0]
    moments = {}
    for index, name in enumerate(parameter_names(module)):
        saved = optimizer["state"].get(index)
        if not saved:
            continue
        pair = []
        for key in ("exp_avg", "exp_avg_sq"):
            tensor = saved[key][run]
            table = name.rpartition(".")[0]
            if table in tables:  # as the whole table: zeros where this group trained no row
                m = tables[table]
                full = tensor.new_zeros(m.vocab, tensor.size(-1))
                full[m.rows] = tensor
                tensor = full
            pair.append(_cpu(tensor))
        moments[name] = pair
    own = {k: v for k, v in checkpoint.items() if k not in GROUP_KEYS}
    return {**own, "state_dict": state, "crisp_run": checkpoint["crisp_runs"][run],
            "optimizer": {"moments": moments, "param_groups": optimizer["param_groups"], "done": optimizer["done"]}}


def merge(module, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The group's checkpoint from its runs' own, in the module's run order and layout (see the module)."""
    tables = _tables(module)
    first = parts[0]
    state = {}
    for key, value in module.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in tables:
            m = tables[owner]
            whole = [p["state_dict"][f"{owner}.table"].to(value.device) for p in parts]
            if leaf == "weight":
                value = torch.stack([t[m.rows] for t in whole]).to(value.dtype)
            elif leaf == "frozen":
                value = torch.stack([t[m.rest] for t in whole]).to(value.dtype)
            elif leaf == "decay":  # the saved tables hold the decayed rows already
                value = torch.ones_like(value)
            state[key] = value
        elif key in first["state_dict"] and first["state_dict"][key].shape == value.shape:
            state[key] = first["state_dict"][key]  # shared by the runs
        else:
            state[key] = torch.stack([p["state_dict"][key] for p in parts])
    optimizer_state = {}
    for index, name in enumerate(parameter_names(module)):
        if name not in first["optimizer"]["moments"]:
            continue
        table = name.rpartition(".")[0]
        entry = {}
        for k, key in enumerate(("exp_avg", "exp_avg_sq")):
            tensors = [p["optimizer"]["moments"][name][k] for p in parts]
            if table in tables:
                tensors = [t[tables[table].rows.cpu()] for t in tensors]
            entry[key] = torch.stack(tensors)
        optimizer_state[index] = entry
    optimizer = {"state": optimizer_state, "param_groups": first["optimizer"]["param_groups"],
                 "done": first["optimizer"]["done"]}
    own = {k: v for k, v in first.items() if k not in ("state_dict", "optimizer", "crisp_run")}
    return {**own, "state_dict": state, "optimizer_states": [optimizer], "crisp_runs": [p["crisp_run"] for p in parts]}


class GroupCheckpointIO(CheckpointIO):
    """Writes the group's checkpoint as one file per active run, and reads them back as one (see the module).
    The path Lightning passes is the first run's; each run's file goes to its own directory."""

    def __init__(self):
        self.module = None  # the LockstepClassifier, set once it exists

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        for position, run in enumerate(self.module.runs):
            if run.output_dir is None or run.error is not None or run.stopped is not None:
                continue
            target = Path(run.output_dir) / run_checkpoints.DIR / run_checkpoints.LAST
            run_checkpoints.save_file(split(self.module, checkpoint, position), target)
            run_checkpoints.write_info(run.output_dir, run.run_key, checkpoint["crisp_position"], run.wandb_id)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        parts = [torch.load(Path(run.output_dir) / run_checkpoints.DIR / run_checkpoints.LAST, map_location="cpu",
                            weights_only=False) for run in self.module.runs]
        return merge(self.module, parts)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


def positions(run_dirs: list[Path], run_keys: list[str]) -> list[tuple | None]:
    """Where each run's checkpoint left it (epoch, batches, step), or None: runs resume together only from one."""
    out = []
    for run_dir, key in zip(run_dirs, run_keys, strict=True):
        if run_checkpoints.resume_point(run_dir, key) is None:
            out.append(None)
            continue
        # from the file, not last.json: a group killed while saving may leave one run's last.json behind its file
        saved = run_checkpoints.saved_position(Path(run_dir) / run_checkpoints.DIR / run_checkpoints.LAST)
        out.append((saved.get("epoch"), saved.get("batches"), saved.get("global_step")))
    return out
