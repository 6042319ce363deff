"""Lightning's Trainer options as a user sets them: accumulation, clipping, validation interval, any other
argument; refused when Lightning has no such argument; applied per run in lockstep, or routed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from crisp.core.config import register_configs, register_resolvers, validate
from crisp.core.errors import ConfigError
from crisp.core.results import run_key
from tests.conftest import ROOT, run_crisp, smoke_overrides

register_configs()
register_resolvers()


def make(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ---------------------------------------------------------------------------------------------- config


def test_common_trainer_options_are_keys_and_any_lightning_argument_passes_with_plus():
    cfg = make("experiment=smoke", "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=1.0",
               "trainer.val_check_interval=0.5", "+trainer.max_time=00:01:00:00")
    validate(cfg)
    from crisp.training.trainer import lightning_options, not_in_lockstep

    options = lightning_options(cfg)
    assert options["accumulate_grad_batches"] == 2 and options["gradient_clip_val"] == 1.0
    assert options["val_check_interval"] == 0.5 and options["max_time"] == "00:01:00:00"
    assert not_in_lockstep(cfg) == ["trainer.max_time"]  # the other three apply per run


def test_cuda_is_a_gpu_and_what_lockstep_cannot_apply_sends_its_runs_to_a_process_each(tmp_path):
    """``trainer.accelerator=cuda`` (Lightning's other name for a GPU) gets a GPU's defaults; a strategy of the
    user's own or data loader workers cannot apply in a fused group (which packs its batches with the launcher's
    pack_workers), and pin_memory applies there as alone."""
    from crisp.sweep.lockstep_launcher import why_not_in_lockstep
    from crisp.training.data import pin_memory
    from crisp.training.trainer import lockstep_blockers, trainer_settings
    from tests.test_lockstep import _job

    settings = trainer_settings(make("trainer.accelerator=cuda"))
    assert (settings["accelerator"], settings["precision"]) == ("gpu", "bf16-mixed")
    assert lockstep_blockers(make("experiment=smoke", "data.num_workers=2")) == ["data.num_workers=2"]
    assert why_not_in_lockstep(_job(tmp_path, "trainer.strategy=fsdp")).startswith(
        "trainer.strategy=fsdp: a fused group trains on one device")
    assert [pin_memory(make("experiment=smoke", f"data.pin_memory={pin}").data, on_gpu=True)
            for pin in ("auto", "true", "false")] == [True, True, False]
    assert pin_memory(make("experiment=smoke").data, on_gpu=False) is False


def test_an_unknown_trainer_key_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"trainer.foo=1 is not allowed: trainer has no key 'foo'"):
        validate(make("experiment=smoke", "+trainer.foo=1"))
    with pytest.raises(ConfigError, match="trainer.enable_checkpointing=True is not allowed: crisp sets it"):
        validate(make("experiment=smoke", "+trainer.enable_checkpointing=true"))


def test_an_unknown_trainer_key_on_the_command_line_exits_2_naming_it(tmp_path):
    proc = run_crisp(*smoke_overrides(tmp_path), "+trainer.foo=1")
    assert proc.returncode == 2
    assert "crisp: error: trainer.foo=1 is not allowed: trainer has no key 'foo'" in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_new_keys_at_their_defaults_leave_the_run_key_of_a_committed_run_unchanged():
    """A run recorded before these keys existed (multirun/results/used-by-grid-auto) composes today, with its
    overrides, to the config it recorded plus the new keys at their defaults: the same run_key."""
    path = sorted((ROOT / "multirun/results/used-by-grid-auto").rglob("results.json"))[0]
    record = json.loads(path.read_text())
    assert "callbacks" not in record["config"] and "accumulate_grad_batches" not in record["config"]["trainer"]
    overrides = [o for o in record["overrides"] if not o.startswith("data.dir")]
    cfg = OmegaConf.to_container(make(*overrides, "data.dir=/tmp", "model.name_or_path=x"), resolve=True)
    # the machine's paths are recorded portably: put the recorded ones back
    cfg["model"]["name_or_path"], cfg["data"]["dir"] = (record["config"]["model"]["name_or_path"],
                                                        record["config"]["data"]["dir"])
    assert {"callbacks", "objective"} <= set(cfg) and "checkpoint_every_n_steps" in cfg["trainer"]
    assert run_key(cfg) == run_key(record["config"])
    # what changes a run changes its key; when it checkpoints does not
    assert run_key({**cfg, "trainer": {**cfg["trainer"], "accumulate_grad_batches": 2}}) != run_key(cfg)
    assert run_key({**cfg, "trainer": {**cfg["trainer"], "checkpoint_every_n_steps": 50}}) == run_key(cfg)
    assert run_key({**cfg, "objective": "best"}) == run_key(cfg)


# ---------------------------------------------------------------------------------------------- clipping


def test_lockstep_clips_each_runs_gradient_by_its_own_norm():
    from crisp.lockstep.per_run import clip_per_run

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(3, 4, 5)), torch.nn.Parameter(torch.zeros(3, 7))]
    scales = torch.tensor([10.0, 0.01, 3.0])  # run 1's gradient is under the limit
    for p in params:
        p.grad = torch.randn_like(p) * scales.view(-1, *([1] * (p.dim() - 1)))
    alone = []
    for run in range(3):  # what clip_grad_norm_ does to each run's gradient alone
        grads = [p.grad[run].clone().requires_grad_() for p in params]
        for g in grads:
            g.grad = g.detach().clone()
        torch.nn.utils.clip_grad_norm_(grads, 1.0)
        alone.append([g.grad for g in grads])
    norms = clip_per_run(params, 1.0)
    after = torch.stack([torch.cat([p.grad[run].flatten() for p in params]).norm() for run in range(3)])
    assert norms[0] > 1 and norms[1] < 1 and norms[2] > 1
    torch.testing.assert_close(after[[0, 2]], torch.ones(2), rtol=1e-5, atol=1e-5)  # clipped to 1, each alone
    torch.testing.assert_close(after[1], norms[1])  # untouched
    for run in range(3):
        for p, expected in zip(params, alone[run], strict=True):
            torch.testing.assert_close(p.grad[run], expected)


# ---------------------------------------------------------------------------------------------- as users run them

GRAD_NORMS = '''
import json, os
import pytorch_lightning as pl
import torch


class GradNorms(pl.Callback):
    """Records each optimizer step's gradient norm after clipping (the gradients stay until the next step)."""

    def __init__(self, path):
        self.path, self.step = path, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if grads and trainer.global_step > self.step:  # the optimizer stepped after this batch
            self.step = trainer.global_step
            norm = float(torch.cat([g.flatten() for g in grads]).norm())
            with open(self.path, "a") as f:
                f.write(json.dumps([trainer.global_step, norm]) + "\\n")
'''


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_accumulation_clipping_and_validation_interval_reach_a_single_run(tmp_path):
    """accumulate_grad_batches=2 halves the optimizer steps, gradient_clip_val clips (a user's own callback,
    by its class path, sees the clipped norm), val_check_interval=0.5 validates twice an epoch."""
    (tmp_path / "gradnorms.py").write_text(GRAD_NORMS)
    out = tmp_path / "run"
    proc = run_crisp(*smoke_overrides(out, "data.num_train=256", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
                                      "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=0.01",
                                      "trainer.val_check_interval=0.5", "+callbacks.norms._target_=gradnorms.GradNorms",
                                      f"+callbacks.norms.path={tmp_path / 'norms.jsonl'}"),
                     env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics_rows(out)
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert steps == list(range(8))  # 256 examples, batch 32: 8 batches an epoch, 4 optimizer steps, 2 epochs
    validations = [r for r in rows if r.get("val/acc")]
    assert len(validations) == 4  # twice an epoch
    norms = [json.loads(line)[1] for line in (tmp_path / "norms.jsonl").read_text().splitlines()]
    assert len(norms) == 8 and norms == pytest.approx([0.01] * 8, rel=1e-4)  # every step's clipped to 0.01
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "completed" and len(record["history"]) == 2


@pytest.mark.slow
def test_trainer_options_apply_to_each_run_of_a_lockstep_group_as_alone(tmp_path):
    """Accumulation, clipping by each run's own norm and a validation interval: each run of a group follows the
    same losses, validations and weights as it does alone, and its logger gets every validation."""
    from tests.test_lockstep import EXACT, NO_DROPOUT, _equal_training

    grid = ["experiment=smoke", "data.num_train=128", "data.num_val=64", "data.eval_batch_size=16",
            "trainer.max_epochs=2", *EXACT, *NO_DROPOUT, "seed=1,2", "sparsity=0,0.8",
            "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=0.05", "trainer.val_check_interval=0.5"]
    _, fused = _equal_training(tmp_path, grid, runs=4, steps=4)
    for name in fused:
        rows = metrics_rows(tmp_path / "lockstep" / name)
        assert len([r for r in rows if r.get("val/acc")]) == 4  # every validation, twice an epoch


@pytest.mark.slow
def test_an_option_lockstep_cannot_apply_per_run_routes_its_jobs_with_one_line_or_stops_a_forced_lockstep(tmp_path):
    option = "+trainer.max_time=00:02:00:00"
    forced = run_crisp("-m", *smoke_overrides(tmp_path / "forced", "hydra/launcher=lockstep", option, sweep=True),
                       "seed=1,2")
    assert forced.returncode == 2
    assert "crisp: error: trainer.max_time is not allowed with hydra/launcher=lockstep" in forced.stderr
    assert not list((tmp_path / "forced").rglob("results.json"))  # nothing trained
    auto = run_crisp("-m", *smoke_overrides(tmp_path / "auto", option, sweep=True), "seed=1,2")
    assert auto.returncode == 0, auto.stderr[-3000:]
    said = auto.stdout + auto.stderr
    assert said.count("trainer.max_time cannot apply per run in a fused lockstep group: its 2 runs train one "
                      "process each") == 1
    found = [json.loads(p.read_text()) for p in (tmp_path / "auto").rglob("results.json")]
    assert len(found) == 2 and all(r["status"] == "completed" and "lockstep" not in r["timing"] for r in found)


def test_the_cuda_graph_step_sums_accumulated_gradients_as_lightning_scales_them():
    """In manual optimization (CUDA graphs) crisp accumulates itself: each step's gradient, written afresh by the
    graph, is added to a sum scaled by 1/accumulate; the last step's gradient becomes the whole sum."""
    from crisp.training.cuda_graphs import GraphedTrainStep

    step = GraphedTrainStep.__new__(GraphedTrainStep)  # (its graphs need CUDA; the sum does not)
    param = torch.nn.Parameter(torch.zeros(3))
    step.params, step._sum = [param], None
    grads = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, -1.0]), torch.tensor([2.0, 4.0, 4.0])]
    for k, grad in enumerate(grads):
        param.grad = grad.clone()  # as a graph's replay overwrites its gradient buffer
        step._accumulate(1 / 3, into_grads=k == 2)
    torch.testing.assert_close(param.grad, sum(grads) / 3)
    assert torch.equal(step._sum[0], torch.zeros(3))  # the next sum starts from nothing
