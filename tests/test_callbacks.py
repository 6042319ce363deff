"""The callbacks group: Lightning callbacks by _target_, presets, a user's own class; early stopping alone and
per run of a lockstep group."""

from __future__ import annotations

import json

import pytest
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from crisp.core.config import validate
from crisp.core.errors import ConfigError
from crisp.training.callbacks import build, not_in_lockstep
from crisp.training.tasks import TASKS
from tests.conftest import run_crisp, smoke_overrides
from tests.test_trainer_options import make


def test_presets_are_instantiated_with_the_tasks_primary_metric_and_the_runs_folder(tmp_path):
    cfg = make("experiment=smoke", "callbacks=[early_stopping,checkpoint,lr_monitor]", "data=cola")
    validate(cfg)
    built = {type(c): c for c in build(cfg, TASKS["cola"], tmp_path)}
    assert built[EarlyStopping].monitor == "val/mcc" and built[EarlyStopping].patience == 3
    assert built[ModelCheckpoint].monitor == "val/mcc"
    assert built[ModelCheckpoint].dirpath == str(tmp_path / "checkpoints")
    assert built[LearningRateMonitor].logging_interval == "step"
    # early stopping and the learning rate apply per run in lockstep; keeping each run's best model does not
    assert not_in_lockstep(cfg) == ["callbacks.checkpoint (ModelCheckpoint)"]


def test_a_learning_rate_monitor_lockstep_cannot_log_per_run_is_named_and_strict_early_stopping_raises_as_alone():
    """A group logs each run's learning rate at each step: by epoch, or momentum and weight decay too, its runs train
    one process each. An early stopping whose monitor the run does not log raises Lightning's own error in a group
    as alone (strict), or is skipped (strict=false)."""
    from types import SimpleNamespace

    from crisp.lockstep.per_run import RunStopping

    by_epoch = make("experiment=smoke", "callbacks=lr_monitor", "callbacks.lr_monitor.logging_interval=epoch",
                    "+callbacks.lr_monitor.log_momentum=true")
    assert not_in_lockstep(by_epoch) == ["callbacks.lr_monitor.logging_interval=epoch",
                                         "callbacks.lr_monitor.log_momentum=True"]
    assert not_in_lockstep(make("experiment=smoke", "callbacks=lr_monitor")) == []
    trainer = SimpleNamespace(val_check_interval=0.5, check_val_every_n_epoch=1)  # checked at validation's end
    logged = {"val/loss": torch.tensor(0.5), "val/acc": torch.tensor(0.8)}
    with pytest.raises(RuntimeError) as in_group:
        RunStopping([EarlyStopping(monitor="val/los")]).check(trainer, logged, epoch_end=False)
    with pytest.raises(RuntimeError) as alone:
        EarlyStopping(monitor="val/los")._validate_condition_metric(logged)
    assert str(in_group.value) == str(alone.value) and "`val/los` which is not available" in str(alone.value)
    assert RunStopping([EarlyStopping(monitor="val/los", strict=False)]).check(trainer, logged, epoch_end=False) \
        is None


def test_a_users_own_callback_by_class_path_and_a_bad_one_named(tmp_path):
    cfg = make("experiment=smoke", "+callbacks.timer._target_=pytorch_lightning.callbacks.Timer",
               "+callbacks.timer.duration=00:01:00:00")
    validate(cfg)
    [timer] = build(cfg, TASKS["sst2"], tmp_path)
    assert type(timer).__name__ == "Timer"
    assert not_in_lockstep(cfg) == ["callbacks.timer (Timer)"]
    with pytest.raises(ConfigError, match=r"callbacks.x=1 is not allowed: a callback is a mapping with a _target_"):
        validate(make("experiment=smoke", "+callbacks.x=1"))
    with pytest.raises(ConfigError, match=r"callbacks.x._target_='nosuchpackage.Thing' is not allowed: there is no "
                                          r"installed package 'nosuchpackage'"):
        validate(make("experiment=smoke", "+callbacks.x._target_=nosuchpackage.Thing"))
    missing = make("experiment=smoke", "+callbacks.x._target_=pytorch_lightning.callbacks.NoSuchCallback")
    with pytest.raises(ConfigError, match=r"callbacks.x._target_='pytorch_lightning.callbacks.NoSuchCallback' is not "
                                          r"allowed: it cannot be imported"):
        build(missing, TASKS["sst2"], tmp_path)


# patience 0 on the validation loss: a run stops at the first validation whose loss is not lower
STOP = ["callbacks=early_stopping", "callbacks.early_stopping.patience=0", "callbacks.early_stopping.monitor=val/loss",
        "callbacks.early_stopping.mode=min"]


@pytest.mark.slow
def test_early_stopping_stops_a_run_and_one_run_of_a_lockstep_group_the_others_going_on(tmp_path):
    """The same runs alone (one process each) and as one group: each stops where it stops alone, with the same
    history, completed; in the group the others go on."""
    from tests.test_lockstep import NO_DROPOUT, _by_folder

    grid = [*smoke_overrides(tmp_path, "data.num_train=256", "trainer.max_epochs=4", *NO_DROPOUT, *STOP, sweep=True),
            "seed=1,2,3"]
    alone = run_crisp("-m", *grid, "hydra/launcher=basic", f"hydra.sweep.dir={tmp_path / 'alone'}")
    together = run_crisp("-m", *grid, "hydra/launcher=lockstep", f"hydra.sweep.dir={tmp_path / 'lockstep'}")
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert together.returncode == 0, together.stderr[-3000:]
    solo, fused = _by_folder(tmp_path / "alone"), _by_folder(tmp_path / "lockstep")
    epochs = {name: len(r["history"]) for name, r in solo.items()}
    assert min(epochs.values()) < 4 and max(epochs.values()) > min(epochs.values())  # one stopped, others went on
    for name, record in solo.items():
        got = fused[name]
        assert got["status"] == record["status"] == "completed"
        assert len(got["history"]) == len(record["history"]), name
        for epoch, expected in zip(got["history"], record["history"], strict=True):
            assert epoch == pytest.approx(expected, rel=1e-4, abs=1e-5), name
        assert (got["stopped"] is None) == (record["stopped"] is None)
        if record["stopped"]:
            assert got["stopped"]["epoch"] == record["stopped"]["epoch"] == len(record["history"]) - 1
            assert "EarlyStopping(monitor=val/loss)" in got["stopped"]["by"]
    assert {r["timing"]["lockstep"]["runs"] for r in fused.values()} == {3}  # one group
    assert json.loads((tmp_path / "lockstep" / "dense_seed1" / "results.json").read_text())["resumed_from_step"] is None
