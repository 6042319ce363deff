"""Lockstep: a group of runs trained as one fused model behaves like each run trained alone."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import crisp
from crisp.core import results
from crisp.lockstep.dropout import RunProbabilities, RunRandom
from crisp.lockstep.fused import FusedEmbedding, FusedProjections, follow_weight_decay, fuse, run_state_dict
from crisp.lockstep.packing import attention_mask, pack, pack_rows
from crisp.lockstep.run_adamw import RunAdamW, RunOptim
from crisp.sparsity.families import family_of
from crisp.sweep.lockstep_launcher import fusion_key, plan
from tests.conftest import ROOT, run_crisp, smoke_overrides, tiny_model
from tests.test_sweep import records, wait_for, workers_of

NO_DROPOUT = ["+model.from_config.dropout=0", "+model.from_config.attention_dropout=0",
              "+model.from_config.seq_classif_dropout=0"]


# ---------------------------------------------------------------------------------------------- pieces


def test_packing_keeps_every_sentence_whole_and_apart():
    from crisp.training.data import TokenizedSplit

    lengths = torch.tensor([5, 3, 7, 2, 6])
    ids = torch.stack([torch.arange(100 * i, 100 * i + 8) for i in range(5)])
    split = TokenizedSplit(ids, lengths, torch.tensor([0, 1, 0, 1, 1]))
    batch = pack([(split, [0, 1, 2]), (split, [3, 4, 0])], width=8)
    rows = batch["input_ids"].size(0)
    assert rows % 2 == 0 and batch["input_ids"].size(1) == 8  # the same number of rows per run
    flat_ids, flat_pos = batch["input_ids"].flatten(), batch["position_ids"].flatten()
    for first, sentence in zip(batch["first"].tolist(), [0, 1, 2, 3, 4, 0], strict=True):
        n = int(lengths[sentence])
        assert flat_ids[first : first + n].tolist() == ids[sentence, :n].tolist()
        assert flat_pos[first : first + n].tolist() == list(range(n))
    assert batch["labels"].tolist() == [0, 1, 0, 1, 1, 0]
    assert all(r < rows // 2 for r in torch.div(batch["first"][:3], 8, rounding_mode="floor").tolist())
    mask = attention_mask(batch["segments"])[:, 0]
    segments = batch["segments"]
    for row in range(rows):
        for q in range(8):
            expected = [(segments[row, q] >= 0 and segments[row, k] == segments[row, q]) or k == q for k in range(8)]
            assert mask[row, q].tolist() == expected


def test_first_fit_packs_longest_first():
    row, offset, count = pack_rows([5, 3, 7, 2, 6], width=8)
    # 7 takes row 0, 6 row 1, 5 row 2, then 3 fits only after the 5 and 2 after the 6
    assert count == 3 and row == [2, 2, 0, 1, 1] and offset == [0, 5, 0, 6, 0]


def _sentences(count: int, low: int, high: int, seed: int = 0):
    from crisp.training.data import TokenizedSplit

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (count,), generator=g)
    ids = torch.randint(low, high, (count, 12), generator=g) * (torch.arange(12) < lengths[:, None])
    return TokenizedSplit(ids, lengths, torch.randint(0, 2, (count,), generator=g))


def _fused_logits(fused, split, runs: int, arch: str, random: RunRandom | None = None) -> torch.Tensor:
    from crisp.lockstep.fused import sentences_start_at
    from crisp.sparsity.attention import RunRows, batch_of_runs
    from crisp.sparsity.families import family_of

    batch = pack([(split, list(range(len(split))))] * runs, width=16)
    extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    first = family_of(fused).first_position(fused)
    rows = RunRows(runs, query_valid=batch["segments"] >= 0, dropout=None if random is None else random.dropout)
    with batch_of_runs(rows), sentences_start_at(batch["first"]):
        return fused(input_ids=batch["input_ids"], attention_mask=attention_mask(batch["segments"]),
                     position_ids=batch["position_ids"] + first, **extra).logits


@pytest.mark.parametrize("arch", ["distilbert", "bert", "mpnet"])
def test_a_fused_model_computes_what_each_run_computes_alone(arch):
    """Forward of packed sentences through the fused model = each model on its own padded batch."""
    models = [tiny_model(arch, seed=seed) for seed in (0, 1, 2)]
    sparsities = (0.0, 0.5, 0.8)
    for model, s in zip(models, sparsities, strict=True):
        crisp.set_sparsity(model, s)
    split = _sentences(5, 5, 60)
    expected = [m(input_ids=split.input_ids, attention_mask=(split.input_ids != 0).long()).logits for m in models]
    weights = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]
    fused = fuse(models, RunRandom([0, 1, 2], "cpu"), projections=family_of(models[0]).projections).eval()
    # each attention's query, key and value: one matmul
    assert sum(isinstance(m, FusedProjections) for m in fused.modules()) == fused.config.num_hidden_layers
    for module in crisp.sparsity.families.attention_modules(fused):
        module.crisp_sparsity = sparsities
    torch.testing.assert_close(_fused_logits(fused, split, 3, arch), torch.cat(expected), rtol=1e-5, atol=1e-6)
    for run, own in enumerate(weights):  # and each run comes back out as its own model, name for name
        state = run_state_dict(fused, run)
        assert state.keys() == own.keys()
        for name, tensor in own.items():
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_word_embeddings_the_training_data_never_holds_only_decay_as_adamw_decays_them_alone():
    """Rows outside the training tokens leave the optimizer: after AdamW steps (strong weight decay)
    every run's whole table, and its logits on sentences with unseen tokens, are those of the run alone."""
    from torch.nn import functional as F
    from transformers import get_linear_schedule_with_warmup

    train, unseen = _sentences(6, 1, 40), _sentences(4, 30, 64, seed=1)  # vocab 64: ids 40-63 never train
    alone = [tiny_model("bert", seed=seed).train() for seed in (0, 1)]
    fused = fuse([tiny_model("bert", seed=seed) for seed in (0, 1)], RunRandom([0, 1], "cpu"),
                 trained_tokens=train.input_ids.unique()).train()
    # the runs decay at rates of their own
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=decay)
                  for m, decay in zip(alone, (20.0, 5.0), strict=True)]
    schedules = [get_linear_schedule_with_warmup(o, 0, 3) for o in optimizers]
    group = RunAdamW(list(fused.parameters()), [], [RunOptim(1e-3, 20.0, 0.0), RunOptim(1e-3, 5.0, 0.0)], 3)
    follow_weight_decay(fused, group)
    words = next(m for m in fused.modules() if isinstance(m, FusedEmbedding) and m.frozen is not None)
    assert words.weight.shape[1] == len(train.input_ids.unique()) < 64
    for _ in range(3):
        for model, optimizer, schedule in zip(alone, optimizers, schedules, strict=True):
            optimizer.zero_grad()
            F.cross_entropy(model(input_ids=train.input_ids, attention_mask=(train.input_ids != 0).long()).logits,
                            train.labels).backward()
            optimizer.step()
            schedule.step()
        group.zero_grad()
        logits = _fused_logits(fused, train, 2, "bert")
        F.cross_entropy(logits, train.labels.repeat(2), reduction="none").view(2, -1).mean(1).sum().backward()
        group.step()
    for run, model in enumerate(alone):
        state = run_state_dict(fused, run)
        for name, tensor in model.state_dict().items():
            if name in state:
                torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
        untouched = model.get_input_embeddings().weight[40:]
        assert not torch.equal(untouched, tiny_model("bert", seed=run).get_input_embeddings().weight[40:])  # decayed
    expected = [m.eval()(input_ids=unseen.input_ids, attention_mask=(unseen.input_ids != 0).long()).logits
                for m in alone]
    torch.testing.assert_close(_fused_logits(fused.eval(), unseen, 2, "bert"), torch.cat(expected),
                               rtol=1e-5, atol=1e-5)


def test_each_run_has_its_own_dropout_stream():
    """A run's masks depend on its seed, the step and the call site, not on the rest of its group."""
    shape = torch.Size([2, 3, 1000])
    group_a, group_b = RunRandom([11, 22], "cpu"), RunRandom([11, 33], "cpu")
    masks = {}
    for name, random in (("a", group_a), ("b", group_b)):
        random.next_step()
        first, second = random.keep_mask(shape, 0.1, "cpu"), random.keep_mask(shape, 0.1, "cpu")
        random.next_step()
        masks[name] = first, second, random.keep_mask(shape, 0.1, "cpu")
    (a1, a2, a3), (b1, _, b3) = masks["a"], masks["b"]
    assert torch.equal(a1[0], b1[0]) and torch.equal(a3[0], b3[0])  # seed 11, whatever its neighbours
    assert not torch.equal(a1[1], b1[1])  # seeds 22 and 33
    assert not torch.equal(a1[0], a2[0]) and not torch.equal(a1[0], a3[0])  # sites and steps
    assert 0.88 < a1.float().mean() < 0.92


def test_each_run_drops_at_its_own_rate():
    random = RunRandom([11, 22, 33], "cpu")
    random.next_step()
    probs = torch.tensor([0.0, 0.5, 0.9])
    out = random.dropout(torch.ones(3, 20_000), RunProbabilities(0.9, probs, 1 / (1 - probs)))
    assert torch.equal(out[0], torch.ones(20_000))  # dropout off: untouched
    for run, p in ((1, 0.5), (2, 0.9)):
        kept = out[run] != 0
        assert abs(kept.float().mean() - (1 - p)) < 0.01
        torch.testing.assert_close(out[run][kept], torch.full((int(kept.sum()),), 1 / (1 - p)))


@pytest.mark.parametrize("arch", ["distilbert", "bert", "mpnet"])
def test_runs_of_one_group_drop_with_their_own_probabilities_at_every_site(arch):
    """The same weights, one run with every dropout off, one with all on (hidden, attention, classifier as the
    family has them): in a training step the first computes exactly its evaluation logits, the second does not."""
    from crisp.sparsity.families import dropout_attributes
    from crisp.training.encoder import dropout_overrides
    from tests.conftest import tiny_config

    def model(p: float):
        config = tiny_config(arch)
        for key, value in dropout_overrides(config, dict.fromkeys(dropout_attributes(config), p)).items():
            setattr(config, key, value)
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(config, attn_implementation="crisp")

    split = _sentences(6, 5, 60)
    random = RunRandom([1, 2], "cpu")
    fused = fuse([model(0.0), model(0.3)], random)
    expected = _fused_logits(fused.eval(), split, 2, arch)
    random.next_step()
    logits = _fused_logits(fused.train(), split, 2, arch, random)
    torch.testing.assert_close(logits[:6], expected[:6], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits[6:], expected[6:], rtol=1e-3, atol=1e-3)


def _job(tmp_path, *overrides):
    from crisp.core.config import register_configs, register_resolvers
    from crisp.sweep.jobs import Job

    register_configs()
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", *overrides], return_hydra_config=True)
    return Job(0, list(overrides), cfg, tmp_path, {"name": "-".join(overrides)}, tmp_path)


def test_jobs_that_differ_in_seed_sparsity_or_strategy_fuse(tmp_path):
    jobs = [_job(tmp_path, "seed=1"), _job(tmp_path, "seed=2", "sparsity=0.8"), _job(tmp_path, "strategy=adaptive"),
            _job(tmp_path, "data.num_train=64"), _job(tmp_path, "optim.betas=[0.9,0.98]")]
    assert fusion_key(jobs[0]) == fusion_key(jobs[1]) == fusion_key(jobs[2])  # data_seed: ${seed} is one recipe
    assert len({fusion_key(job) for job in jobs}) == 3
    assert [len(g) for g in plan(jobs, capacity=None, devices=1)] == [3, 1, 1]
    assert [len(g) for g in plan(jobs[:3], capacity=2, devices=1)] == [2, 1]  # too big for the device
    assert [len(g) for g in plan(jobs[:3], capacity=None, devices=2)] == [2, 1]  # one group per GPU


def test_jobs_that_differ_in_lr_weight_decay_warmup_dropout_or_the_sparsifiers_own_keys_fuse(tmp_path):
    jobs = [_job(tmp_path, "seed=1"), _job(tmp_path, "optim.lr=0.01", "optim.weight_decay=0.1"),
            _job(tmp_path, "optim.warmup_ratio=0.2"), _job(tmp_path, "dropout.hidden=0.3", "dropout.attention=0"),
            _job(tmp_path, "dropout.classifier=0.2")]
    assert len({fusion_key(job) for job in jobs}) == 1
    entmax = [_job(tmp_path, "sparsifier=entmax"), _job(tmp_path, "sparsifier=entmax", "sparsifier.alpha=2")]
    assert fusion_key(entmax[0]) == fusion_key(entmax[1]) != fusion_key(jobs[0])  # alpha per run; one choice a group


GPT_NEO = ["~model.from_config", "+model.from_config={model_type:gpt_neo,hidden_size:32,num_layers:2,num_heads:4,"
           "attention_types:[[[global,local],1]],window_size:4,max_position_embeddings:128}"]


def test_the_sweep_says_from_the_config_why_a_recipe_cannot_train_in_lockstep(tmp_path):
    """Decided in the sweep's process from the model's config (no weights): the encoders lockstep fuses, a causal
    family it cannot, a Trainer setting it cannot apply per run."""
    from crisp.sweep.lockstep_launcher import why_not_in_lockstep

    for fuses in ([], ROBERTA, DEBERTA_V3, MPNET):
        assert why_not_in_lockstep(_job(tmp_path, *fuses)) is None, fuses
    why = why_not_in_lockstep(_job(tmp_path, *GPT_NEO))
    assert why.startswith("GPTNeoForSequenceClassification cannot train in lockstep (causal: its classifier reads "
                          "each sentence's last token")
    assert why_not_in_lockstep(_job(tmp_path, "trainer.accumulate_grad_batches=2")) is None  # applied per run
    assert why_not_in_lockstep(_job(tmp_path, "+trainer.max_time=00:01:00:00")) == \
        "trainer.max_time cannot apply per run in a fused lockstep group"


def test_lockstep_forced_on_a_family_it_cannot_fuse_stops_before_any_run_trains_with_exit_2(tmp_path):
    proc = run_crisp("-m", *smoke_overrides(tmp_path, *GPT_NEO, "hydra/launcher=lockstep", sweep=True), "seed=1,2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("crisp: error: lockstep cannot train dense_seed1 and the 1 other run(s) of its recipe: "
                           "GPTNeoForSequenceClassification cannot train in lockstep (causal: ")
    assert last.endswith("train them with hydra/launcher=auto (it runs them one process each)")
    assert "Traceback" not in proc.stderr
    assert not results.find_all(tmp_path) and not list(tmp_path.glob("lockstep-group*.log"))  # nothing trained


@pytest.mark.slow
def test_auto_trains_a_family_lockstep_cannot_fuse_one_process_per_run_and_says_why_in_one_line(tmp_path):
    proc = run_crisp("-m", *smoke_overrides(tmp_path, *GPT_NEO, sweep=True), "seed=1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = records(tmp_path)
    assert sorted(found) == ["dense_seed1", "dense_seed2"] and all(r["status"] == "completed" for r in found.values())
    assert len({r["environment"]["pid"] for r in found.values()}) == 2  # a process each
    assert not any("lockstep" in r["timing"] for r in found.values())
    said = [line for line in proc.stdout.splitlines() if "train one process each" in line]
    assert len(said) == 1 and "GPTNeoForSequenceClassification cannot train in lockstep (causal: " in said[0], said


# ---------------------------------------------------------------------------------------------- as users run it


@pytest.mark.slow
def test_the_readme_lockstep_smoke_grid_trains_in_one_process(tmp_path):
    proc = run_crisp("-m", "experiment=smoke", "sparsity=0,0.8", "seed=1,2", "hydra/launcher=lockstep",
                     f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = records(tmp_path)
    assert sorted(found) == ["dense_seed1", "dense_seed2", "uniform_s0.8_seed1", "uniform_s0.8_seed2"]
    assert all(r["status"] == "completed" for r in found.values())
    assert len({r["environment"]["pid"] for r in found.values()}) == 1
    assert all(r["timing"]["lockstep"]["runs"] == 4 for r in found.values())
    assert found["uniform_s0.8_seed1"]["layers"]["configured"] == [0.8, 0.8]
    assert (tmp_path / "report.md").is_file() and "| uniform | 0.8 | 2 |" in proc.stdout
    assert not (tmp_path / ".crisp").exists()  # the group's spec and result pickles go once collected


def _step_losses(run_dir) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def _by_folder(sweep_dir) -> dict[str, dict]:
    """Each run's record by its folder in the sweep (runs of several learning rates share names)."""
    return {str(path.parent.relative_to(sweep_dir)): results.read(path) for path in results.find_all(sweep_dir)}


# correlations of a briefly trained regression: its predictions are nearly equal (a spread of about 1e-3
# around the mean label), so float rounding of 1e-7 reorders Spearman's ranks and moves both correlations
# in their 4th digit, by how much depending on the machine. They are compared through the predictions
# they are computed from, one by one, which must agree as closely as the losses.
THROUGH_PREDICTIONS = ("val_pearson", "val_spearman")


def _predictions(folder) -> list[dict]:
    """What tests/record_predictions.py saved: each validation split's predictions, targets and metrics."""
    return [torch.load(path) for path in sorted(folder.glob("*.pt"))]


def _of(saved: list[dict], epoch: dict, metric: str) -> dict:
    """The saved predictions that gave this epoch's metrics (its ``metric`` to the last bit)."""
    [found] = [s for s in saved if s["values"].get(metric) == epoch[metric]]
    return found


def _equal_training(tmp_path, grid: list[str], runs: int, steps: int, env: dict | None = None) -> tuple[dict, dict]:
    """The grid once run by run (Hydra's basic launcher) and once in lockstep: the same losses step by step,
    validation numbers (and, for a rank correlation, the predictions) epoch by epoch and final weights; returns
    both sets of records."""
    saved = {way: tmp_path / "predictions" / way for way in ("alone", "lockstep")}
    recording = {"module": "tests.record_predictions"}
    alone = run_crisp("-m", *grid, "hydra/launcher=basic", f"hydra.sweep.dir={tmp_path / 'alone'}",
                      env={**(env or {}), "CRISP_TEST_PREDICTIONS": str(saved["alone"])}, **recording)
    together = run_crisp("-m", *grid, "hydra/launcher=lockstep", "hydra.launcher.worker_start=fork",
                         f"hydra.sweep.dir={tmp_path / 'lockstep'}",
                         env={**(env or {}), "CRISP_TEST_PREDICTIONS": str(saved["lockstep"])}, **recording)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert together.returncode == 0, together.stderr[-3000:]
    solo, fused = _by_folder(tmp_path / "alone"), _by_folder(tmp_path / "lockstep")
    assert len(fused) == len(solo) == runs and len({r["environment"]["pid"] for r in fused.values()}) == 1
    predictions = {way: _predictions(folder) for way, folder in saved.items()}
    for name, record in solo.items():
        assert fused[name]["run_key"] == record["run_key"]
        assert fused[name]["layers"]["configured"] == record["layers"]["configured"]
        assert fused[name]["layers"]["calibration_entropy"] == record["layers"]["calibration_entropy"]  # adaptive's
        losses = _step_losses(tmp_path / "alone" / name)
        assert len(losses) == steps
        torch.testing.assert_close(_step_losses(tmp_path / "lockstep" / name), losses, rtol=1e-5, atol=1e-6)
        # validation over several batches: each run's own loss and metrics, epoch by epoch
        for epoch, expected in zip(fused[name]["history"], record["history"], strict=True):
            assert epoch.keys() == expected.keys()
            direct = {k: v for k, v in expected.items() if k not in THROUGH_PREDICTIONS}
            assert {k: epoch[k] for k in direct} == pytest.approx(direct, rel=1e-4, abs=1e-5), name
            correlations = [k for k in THROUGH_PREDICTIONS if k in expected]
            if correlations:  # the predictions that each path's recorded correlations were computed from
                metric = record["metric"]
                mine, theirs = _of(predictions["lockstep"], epoch, metric), _of(predictions["alone"], expected, metric)
                assert all(mine["values"][k] == epoch[k] and theirs["values"][k] == expected[k] for k in correlations)
                assert torch.equal(mine["target"], theirs["target"])
                torch.testing.assert_close(mine["preds"], theirs["preds"], rtol=1e-5, atol=1e-6, msg=name)
        # each run's model folder (trainer.save_weights): the same weights, and the same crisp settings saved
        weights = load_file(tmp_path / "alone" / name / "model" / "model.safetensors")
        lockstep_weights = load_file(tmp_path / "lockstep" / name / "model" / "model.safetensors")
        assert weights.keys() == lockstep_weights.keys()
        for key, tensor in weights.items():
            torch.testing.assert_close(lockstep_weights[key], tensor, rtol=1e-5, atol=1e-5, msg=f"{name} {key}")
        configs = [json.loads((tmp_path / way / name / "model" / "config.json").read_text()) for way in ("alone",
                                                                                                        "lockstep")]
        assert configs[0] == configs[1] and configs[0]["crisp"]["sparsity"] == record["layers"]["configured"]
    return solo, fused


EXACT = ["trainer.log_every_n_steps=1", "trainer.save_weights=true", "trainer=cpu", "logger=csv"]


@pytest.mark.slow
def test_runs_in_lockstep_train_exactly_like_runs_alone(tmp_path):
    """Dropout off, fp32: two seeds and two sparsities in one group, uniform and adaptive."""
    grid = ["experiment=smoke", "data.num_train=128", "data.num_val=64", "data.eval_batch_size=16",
            "trainer.max_epochs=2", *EXACT, *NO_DROPOUT, "seed=1,2", "sparsity=0.5,0.8", "strategy=uniform,adaptive"]
    _, fused = _equal_training(tmp_path, grid, runs=8, steps=8)
    assert fused["adaptive_s0.8_seed2"]["layers"]["configured"] != [0.8, 0.8]  # adaptive really spread it


@pytest.mark.slow
def test_runs_of_their_own_lr_weight_decay_and_warmup_train_in_one_group_exactly_like_alone(tmp_path):
    """Dropout off, fp32: two seeds, two sparsities and two optimizer settings (learning rate, weight
    decay and warm-up each differ) in one group, each run as it trains alone."""
    grid = ["experiment=smoke", "data.num_train=128", "data.num_val=64", "data.eval_batch_size=16",
            "trainer.max_epochs=2", *EXACT, "dropout.hidden=0", "dropout.attention=0", "dropout.classifier=0",
            "seed=1,2", "sparsity=0.5,0.8",
            "optim={lr:1e-3,weight_decay:0.01,warmup_ratio:0},{lr:3e-3,weight_decay:0.3,warmup_ratio:0.5}"]
    _, fused = _equal_training(tmp_path, grid, runs=8, steps=8)
    assert {r["timing"]["lockstep"]["runs"] for r in fused.values()} == {8}  # one group
    lrs = {r["config"]["optim"]["lr"] for r in fused.values()}
    assert lrs == {1e-3, 3e-3}
    # the report keeps the settings apart: a table for each
    report = (tmp_path / "lockstep" / "report.md").read_text()
    assert "optim.lr=0.001, optim.warmup_ratio=0.0, optim.weight_decay=0.01" in report
    assert "optim.lr=0.003, optim.warmup_ratio=0.5, optim.weight_decay=0.3" in report


MPNET = ["~model.from_config", "+model.from_config={model_type:mpnet,hidden_size:32,num_hidden_layers:2,"
         "num_attention_heads:4,intermediate_size:64,max_position_embeddings:130,hidden_dropout_prob:0,"
         "attention_probs_dropout_prob:0}"]


BERT = ["~model.from_config", "+model.from_config={model_type:bert,hidden_size:32,num_hidden_layers:2,"
        "num_attention_heads:4,intermediate_size:64,hidden_dropout_prob:0,attention_probs_dropout_prob:0}"]


@pytest.mark.slow
def test_mpnet_runs_in_lockstep_train_exactly_like_runs_alone(tmp_path):
    """MPNet's adapter in a fused model: its relative position bias per run and per packed sentence."""
    grid = ["experiment=smoke", "data.num_train=96", "data.num_val=48", "data.eval_batch_size=16",
            "trainer.max_epochs=1", *EXACT, *MPNET, "seed=1,2", "sparsity=0.5,0.8"]
    solo, _ = _equal_training(tmp_path, grid, runs=4, steps=3)
    assert all(r["config"]["model"]["from_config"]["model_type"] == "mpnet" for r in solo.values())


ROBERTA = ["~model.from_config", "+model.from_config={model_type:roberta,hidden_size:32,num_hidden_layers:2,"
           "num_attention_heads:4,intermediate_size:64,max_position_embeddings:130}"]
DEBERTA_V3 = ["~model.from_config", "+model.from_config={model_type:deberta-v2,hidden_size:32,num_hidden_layers:2,"
              "num_attention_heads:4,intermediate_size:64,max_position_embeddings:128,relative_attention:true,"
              "pos_att_type:[p2c,c2p],position_buckets:16,share_att_key:true,position_biased_input:false,"
              "norm_rel_ebd:layer_norm}"]


@pytest.mark.slow
def test_roberta_runs_in_lockstep_train_exactly_like_runs_alone(tmp_path):
    """A family of no module of its own: positions after the padding id, token types, fused query, key and value
    and the dropout keys read off the model (crisp's dropout keys turn them off)."""
    grid = ["experiment=smoke", "data.num_train=96", "data.num_val=48", "data.eval_batch_size=16",
            "trainer.max_epochs=1", *EXACT, *ROBERTA, "dropout.hidden=0", "dropout.attention=0",
            "dropout.classifier=0", "seed=1,2", "sparsity=0.5,0.8"]
    solo, fused = _equal_training(tmp_path, grid, runs=4, steps=3)
    assert {r["trained_model"]["class"] for r in solo.values()} == {"RobertaForSequenceClassification"}
    assert {r["timing"]["lockstep"]["runs"] for r in fused.values()} == {4}


@pytest.mark.slow
def test_deberta_v2_runs_in_lockstep_train_exactly_like_runs_alone(tmp_path):
    """DeBERTa-v3's settings (content-to-position and position-to-content terms, shared keys, relative positions
    in buckets): each run's relative position table and its LayerNorm fused, the terms per run and per packed
    sentence."""
    grid = ["experiment=smoke", "data.num_train=96", "data.num_val=48", "data.eval_batch_size=16",
            "trainer.max_epochs=1", *EXACT, *DEBERTA_V3, "dropout.hidden=0", "dropout.attention=0", "seed=1,2",
            "sparsity=0.5,0.8"]
    solo, fused = _equal_training(tmp_path, grid, runs=4, steps=3)
    assert {r["trained_model"]["class"] for r in solo.values()} == {"DebertaV2ForSequenceClassification"}
    assert {r["timing"]["lockstep"]["runs"] for r in fused.values()} == {4}


@pytest.mark.slow
@pytest.mark.parametrize("sparsifier", [["sparsifier=random", "sparsity=0.5,0.8"],
                                        ["sparsifier=entmax", "sparsifier.alpha=1.5,2"]], ids=["random", "entmax"])
def test_random_keys_and_entmax_train_in_lockstep_exactly_like_alone(tmp_path, sparsifier):
    """random: each run draws its keys from its own stream, the same alone and packed in a group; entmax: one
    alpha per run of one group."""
    grid = ["experiment=smoke", "data.num_train=96", "data.num_val=48", "data.eval_batch_size=16",
            "trainer.max_epochs=2", *EXACT, *NO_DROPOUT, "seed=1,2", *sparsifier]
    _, fused = _equal_training(tmp_path, grid, runs=4, steps=6)
    assert {r["timing"]["lockstep"]["runs"] for r in fused.values()} == {4}  # one group
    achieved = {name: r["layers"]["achieved"] for name, r in fused.items()}
    if "random" in sparsifier[0]:  # every layer dropped its count of keys in training
        assert all(min(a) > 0.2 for a in achieved.values()), achieved
    else:  # sparsemax zeroes keys even on a random-init model's flat scores (entmax15 may not)
        assert all(max(a) > 0 for name, a in achieved.items() if "alpha2" in name), achieved


@pytest.mark.slow
@pytest.mark.parametrize(("task", "folder"), [("rte", "RTE"), ("stsb", "STS-B")])
def test_a_pair_task_and_a_regression_train_in_lockstep_exactly_like_alone(tmp_path, task, folder):
    """Pairs packed whole (BERT: with their token types) and STS-B's one output and MSE, fused."""
    from tests.test_tasks import glue_folders

    glue_folders(tmp_path / "glue", rows=96)  # the shared files' first rows, or files in their layout
    encoder = BERT if task == "rte" else NO_DROPOUT  # RTE with BERT's token types, STS-B with DistilBERT
    grid = ["model=tiny", f"data={task}", f"data.dir={tmp_path / 'glue' / folder}", "data.train_limit=96",
            "data.val_limit=48",
            "data.eval_batch_size=16", "data.max_length=96", "trainer.max_epochs=1", "optim.lr=1e-3", *EXACT,
            *encoder, "seed=1,2", "sparsity=0.5,0.8"]
    solo, _ = _equal_training(tmp_path, grid, runs=4, steps=3)
    metric = {"rte": "val_acc", "stsb": "val_pearson"}[task]
    assert all(r["metric"] == metric and r["task"] == task for r in solo.values())


def test_bert_pairs_in_a_fused_model_keep_their_token_types():
    """Forward of packed pairs with their token types = each BERT on its own padded batch."""
    from crisp.training.data import TokenizedSplit

    models = [tiny_model("bert", seed=seed) for seed in (0, 1)]
    split = _sentences(4, 5, 60, seed=3)
    types = (torch.arange(12) >= split.lengths[:, None] // 2).long() * (torch.arange(12) < split.lengths[:, None])
    pairs = TokenizedSplit(split.input_ids, split.lengths, split.labels, token_type_ids=types)
    expected = [m(input_ids=split.input_ids, attention_mask=(split.input_ids != 0).long(), token_type_ids=types).logits
                for m in models]
    untyped = models[0](input_ids=split.input_ids, attention_mask=(split.input_ids != 0).long()).logits
    assert not torch.allclose(untyped, expected[0])  # the token types matter
    fused = fuse(models, RunRandom([0, 1], "cpu")).eval()
    torch.testing.assert_close(_fused_logits(fused, pairs, 2, "bert"), torch.cat(expected), rtol=1e-5, atol=1e-6)


POISON = """
import torch
from crisp.lockstep import fused_classifier as model
step = model.LockstepClassifier.training_step
def poisoned(self, batch, batch_idx):
    if self.current_epoch == 0 and batch_idx == 2 and "dense_seed2" in [run.name for run in self.runs]:
        victim = [run.name for run in self.runs].index("dense_seed2")
        with torch.no_grad():
            for p in self.encoder.parameters():
                p[victim].fill_(float("nan"))
    return step(self, batch, batch_idx)
model.LockstepClassifier.training_step = poisoned
"""


@pytest.mark.slow
def test_a_run_whose_loss_turns_nan_leaves_the_group_and_the_others_go_on(tmp_path):
    # the learning rate is the group's: poison one run's weights (in every process: sitecustomize)
    (tmp_path / "sitecustomize.py").write_text(POISON)
    out = tmp_path / "sweep"
    grid = [*smoke_overrides(out, "hydra/launcher=lockstep", *NO_DROPOUT, sweep=True), "seed=1,2,3"]
    proc = run_crisp("-m", *grid, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert proc.returncode != 0 and "1 run(s) failed: dense_seed2" in proc.stderr
    found = records(out)
    assert found["dense_seed2"]["status"] == "failed"
    assert "the training loss became nan in epoch 0" in found["dense_seed2"]["error"]["message"]
    assert all(found[name]["status"] == "completed" for name in ("dense_seed1", "dense_seed3"))
    # the others are untouched by it: the same numbers as a group that never had it
    without = run_crisp("-m", *smoke_overrides(tmp_path / "without", "hydra/launcher=lockstep", *NO_DROPOUT,
                                               sweep=True), "seed=1,3")
    assert without.returncode == 0
    for name, record in records(tmp_path / "without").items():
        for epoch, expected in zip(found[name]["history"], record["history"], strict=True):
            assert epoch == pytest.approx(expected, rel=1e-5), name


@pytest.mark.slow
def test_a_killed_group_resumes_and_skips_what_completed(tmp_path):
    overrides = smoke_overrides(tmp_path, "hydra/launcher=lockstep", "trainer.max_epochs=20", sweep=True)
    proc = subprocess.Popen([sys.executable, "-m", "crisp.run", "-m", *overrides, "seed=1,2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: len(list(tmp_path.rglob(".crisp.lock"))) == 2, timeout=180)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not workers_of(tmp_path), timeout=10)
    assert not list(tmp_path.rglob("results.json"))
    short = [o for o in overrides if not o.startswith("trainer.max_epochs")]
    again = run_crisp("-m", *short, "trainer.max_epochs=1", "seed=1,2")
    assert again.returncode == 0, again.stderr[-3000:]
    first = records(tmp_path)
    assert sorted(first) == ["dense_seed1", "dense_seed2"] and all(r["status"] == "completed" for r in first.values())
    more = run_crisp("-m", *short, "trainer.max_epochs=1", "seed=1,2,3")
    assert more.returncode == 0
    assert more.stdout.count("already completed") == 2
    assert {name: r["finished_at"] for name, r in records(tmp_path).items() if name != "dense_seed3"} == \
        {name: r["finished_at"] for name, r in first.items()}
    assert results.read(tmp_path / "dense_seed3")["timing"]["lockstep"]["runs"] == 1
    assert len(list(tmp_path.glob("lockstep-group0-*.log"))) == 3  # each attempt's group log is its own
