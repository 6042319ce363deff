"""Checkpoints and resume mid-run: a run (or a lockstep group) killed with kill -9 during its second epoch, then
the same command, ends exactly as the run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import RandomSampler

from crisp.training.data import ResumableBatches
from tests.conftest import ROOT, run_crisp, tiny_model

# ---------------------------------------------------------------------------------------------- pieces


def test_a_resumed_batch_order_goes_on_exactly_where_training_left_it():
    """Epochs iterated as Lightning iterates them (their length, never past); resumed at epoch 2, batch 3."""
    data = list(range(70))

    def batches():
        return ResumableBatches(RandomSampler(data, generator=torch.Generator().manual_seed(7)), 8, seed=7)

    whole, sampler = [], batches()
    for _ in range(4):
        it = iter(sampler)
        whole.append([next(it) for _ in range(len(sampler))])
    resumed = batches()
    resumed.resume_at(epoch=2, batches=3, per_epoch=len(resumed))
    assert list(resumed) == whole[2][3:]
    it = iter(resumed)
    assert [next(it) for _ in range(len(resumed))] == whole[3]  # and the next epoch as before


def test_a_runs_part_of_a_group_checkpoint_resumes_in_another_group():
    """Split a group of three runs into each run's own checkpoint, merge two of them (another order, another set
    of trained embedding rows) into a new group: each run's weights and AdamW moments are what they were."""
    from crisp.lockstep.checkpoints import merge, split
    from crisp.lockstep.dropout import RunRandom
    from crisp.lockstep.fused import FusedEmbedding, fuse, run_state_dict
    from crisp.lockstep.run_adamw import RunAdamW, RunOptim

    def group(seeds, tokens):
        holder = torch.nn.Module()
        holder.encoder = fuse([tiny_model("bert", seed=s) for s in seeds], RunRandom(seeds, "cpu"),
                              trained_tokens=tokens)
        from crisp.lockstep.checkpoints import parameter_names

        params = dict(holder.named_parameters())
        names = parameter_names(holder)
        decayed = [params[n] for n in names if params[n].dim() >= 3]
        optimizer = RunAdamW(decayed, [params[n] for n in names if params[n].dim() < 3],
                             [RunOptim(1e-2, 0.5, 0.0)] * len(seeds), 10)
        return holder, optimizer

    old, optimizer = group([0, 1, 2], torch.arange(0, 40))
    for _ in range(2):  # moments and decayed frozen rows that are not zero
        optimizer.zero_grad()
        sum(p.square().sum() for p in old.parameters()).backward()
        optimizer.step()
        for m in old.modules():
            if isinstance(m, FusedEmbedding) and m.frozen is not None:
                m.decay.mul_(0.9)
    checkpoint = {"state_dict": old.state_dict(), "optimizer_states": [optimizer.state_dict()],
                  "crisp_runs": [{"name": f"r{i}"} for i in range(3)], "global_step": 2}
    parts = [split(old, checkpoint, run) for run in range(3)]
    new, new_optimizer = group([2, 0], torch.arange(0, 25))  # runs 2 and 0, fewer trained rows
    merged = merge(new, [parts[2], parts[0]])
    new.load_state_dict(merged["state_dict"])
    new_optimizer.load_state_dict(merged["optimizer_states"][0])
    assert [r["name"] for r in merged["crisp_runs"]] == ["r2", "r0"] and new_optimizer.done == 2
    for position, run in ((0, 2), (1, 0)):
        before, after = run_state_dict(old.encoder, run), run_state_dict(new.encoder, position)
        for name, tensor in before.items():
            torch.testing.assert_close(after[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    # the moments of every row the new group trains: as they were for that run
    old_words = next(m for m in old.modules() if isinstance(m, FusedEmbedding) and m.frozen is not None)
    new_words = next(m for m in new.modules() if isinstance(m, FusedEmbedding) and m.frozen is not None)
    old_moment = optimizer.state[old_words.weight]["exp_avg"][2][torch.searchsorted(old_words.rows, new_words.rows)]
    torch.testing.assert_close(new_optimizer.state[new_words.weight]["exp_avg"][0], old_moment)


# ---------------------------------------------------------------------------------------------- as users run it

NO_DROPOUT = ["+model.from_config.dropout=0", "+model.from_config.attention_dropout=0",
              "+model.from_config.seq_classif_dropout=0"]
SMALL = ["experiment=smoke", "data.num_train=512", "data.num_val=128", "trainer.max_epochs=3", "logger=csv",
         "trainer.save_weights=true", "trainer.log_every_n_steps=1", *NO_DROPOUT]


def _kill_in_second_epoch(argv: list[str], info) -> None:
    """Start ``argv``, and kill -9 its whole process group once a checkpoint inside the second epoch exists."""
    proc = subprocess.Popen([sys.executable, "-m", "crisp.run", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "WANDB_SILENT": "true"})
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        try:
            where = json.loads(info.read_text())
        except (OSError, ValueError):
            where = {}
        if where.get("epoch") == 1 and where.get("batches", 0) > 0:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before its second epoch"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _same_run(resumed: dict, whole: dict, run_dir, whole_dir) -> None:
    assert resumed["status"] == whole["status"] == "completed"
    assert resumed["resumed_from_step"] > 16 and whole["resumed_from_step"] is None  # from inside the second epoch
    assert resumed["history"] == whole["history"]  # the whole history: every epoch, the same numbers
    assert resumed["final"] == whole["final"] and resumed["best"] == whole["best"]
    weights = load_file(run_dir / "model" / "model.safetensors")
    expected = load_file(whole_dir / "model" / "model.safetensors")
    for key, tensor in expected.items():
        torch.testing.assert_close(weights[key], tensor, rtol=1e-6, atol=1e-6, msg=key)
    assert not (run_dir / "checkpoints").exists()  # removed once the run completed


@pytest.mark.slow
def test_a_run_killed_in_its_second_epoch_resumes_and_ends_as_if_never_interrupted(tmp_path):
    whole = run_crisp(*SMALL, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    argv = [*SMALL, f"hydra.run.dir={tmp_path / 'run'}", "trainer.checkpoint_every_n_steps=3"]
    info = tmp_path / "run" / "checkpoints" / "last.json"
    _kill_in_second_epoch(argv, info)
    assert not (tmp_path / "run" / "results.json").exists() or \
        json.loads((tmp_path / "run" / "results.json").read_text())["status"] != "completed"
    # killed between writing a checkpoint and its last.json: the file is a save ahead of what last.json says
    where = json.loads(info.read_text())
    where.update(global_step=where["global_step"] - 3, batches=max(0, where["batches"] - 3))
    info.write_text(json.dumps(where))
    again = run_crisp(*argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())
    _same_run(resumed, json.loads((tmp_path / "whole" / "results.json").read_text()), tmp_path / "run",
              tmp_path / "whole")
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f, open(tmp_path / "whole" / "csv" / "metrics.csv") as g:
        assert len(f.readlines()) == len(g.readlines())  # its metrics.csv is whole too


@pytest.mark.slow
def test_a_lockstep_group_killed_in_its_second_epoch_resumes_each_run_as_if_never_interrupted(tmp_path):
    grid = ["-m", *SMALL, "hydra/launcher=lockstep", "seed=1,2", "sparsity=0,0.5"]
    whole = run_crisp(*grid, f"hydra.sweep.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    argv = [*grid, f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer.checkpoint_every_n_steps=5"]
    info = tmp_path / "sweep" / "uniform_s0.5_seed2" / "checkpoints" / "last.json"
    _kill_in_second_epoch(argv, info)
    # killed while the group saved: this run's file is a save ahead of its last.json
    where = json.loads(info.read_text())
    where.update(global_step=where["global_step"] - 5, batches=max(0, where["batches"] - 5))
    info.write_text(json.dumps(where))
    again = run_crisp(*argv)
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("dense_seed1", "dense_seed2", "uniform_s0.5_seed1", "uniform_s0.5_seed2"):
        resumed = json.loads((tmp_path / "sweep" / name / "results.json").read_text())
        _same_run(resumed, json.loads((tmp_path / "whole" / name / "results.json").read_text()),
                  tmp_path / "sweep" / name, tmp_path / "whole" / name)
        assert "lockstep" in resumed["timing"]  # (the runs that stood at one step resumed as one group)
        with open(tmp_path / "sweep" / name / "csv" / "metrics.csv") as f, \
                open(tmp_path / "whole" / name / "csv" / "metrics.csv") as g:
            assert len(f.readlines()) == len(g.readlines())  # its metrics.csv is whole too
