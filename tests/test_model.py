"""The LightningModule's own guarantees."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from crisp.core.config import register_configs, register_resolvers
from crisp.training.classifier import SparseClassifier
from crisp.training.tasks import TASKS
from tests.conftest import ROOT, tiny_model

register_configs()
register_resolvers()


def smoke_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", *overrides])


def test_pretrained_encoders_train_with_dropout():
    encoder = tiny_model("bert").eval()  # from_pretrained hands models over in eval mode
    module = SparseClassifier(encoder, smoke_cfg(), TASKS["sst2"])
    assert all(m.training for m in module.encoder.modules())


def test_a_nan_loss_fails_the_run():
    module = SparseClassifier(tiny_model("distilbert"), smoke_cfg(), TASKS["sst2"])
    module.train_loss.update(torch.tensor(float("nan")))
    module.train_correct.update(torch.tensor([1.0]))
    with pytest.raises(FloatingPointError, match="training loss became nan"):
        module.on_train_epoch_end()


def test_optimizer_decays_matrices_only_and_warms_up():
    module = SparseClassifier(tiny_model("bert"), smoke_cfg("optim.lr=0.001"), TASKS["sst2"])

    class Trainer:  # what configure_optimizers reads from the trainer
        estimated_stepping_batches = 100

    module._trainer = Trainer()
    setup = module.configure_optimizers()
    decay, no_decay = setup["optimizer"].param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    scheduler = setup["lr_scheduler"]["scheduler"]
    assert scheduler.get_last_lr()[0] == 0.0  # linear warm-up over the first 6 steps
    for _ in range(6):
        setup["optimizer"].step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.001)
