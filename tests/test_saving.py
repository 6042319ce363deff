"""A sparse model saved with crisp.save_pretrained loads back sparse, in a fresh process: the same attention
implementation, per-layer sparsity and apply_in_eval, equal logits and equal achieved sparsity."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import crisp
from crisp.training.encoder import train_word_tokenizer
from tests.conftest import ROOT
from tests.encoder_coverage import batch, build

RELOAD = """
import json, sys, torch
import crisp
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
ids, mask = (torch.tensor(x) for x in json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask).logits
print(json.dumps({"implementation": model.config._attn_implementation, "sparsity": crisp.get_sparsity(model),
                  "apply_in_eval": [m.crisp_apply_in_eval for m in crisp.sparsity.layers.attention_layers(model)],
                  "logits": logits.tolist(), "achieved": [s.achieved_sparsity for s in crisp.attention_stats(model)],
                  "vocabulary": AutoTokenizer.from_pretrained(sys.argv[1]).get_vocab()}))
"""


def reload_elsewhere(folder, ids, mask) -> dict:
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(folder), json.dumps([ids.tolist(), mask.tolist()])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["bert", "mpnet", "deberta-v2"])
def test_a_saved_sparse_model_loads_back_sparse_in_a_fresh_process(arch, tmp_path):
    model, _ = build(arch)
    crisp.prepare(model)
    per_layer = crisp.set_sparsity(model, [0.5, 0.8])
    crisp.configure(model, apply_in_eval=True)
    ids, mask = batch(True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    achieved = [s.achieved_sparsity for s in crisp.attention_stats(model)]
    tokenizer = train_word_tokenizer(["a tiny vocabulary for a tiny model"], 16)
    assert crisp.save_pretrained(model, tmp_path, tokenizer) == tmp_path

    back = reload_elsewhere(tmp_path, ids, mask)
    assert back["implementation"] == "crisp" and back["sparsity"] == per_layer == [0.5, 0.8]
    assert back["apply_in_eval"] == [True, True] and back["vocabulary"] == tokenizer.get_vocab()
    torch.testing.assert_close(torch.tensor(back["logits"]), logits, rtol=0, atol=1e-6)
    assert back["achieved"] == pytest.approx(achieved, abs=1e-7) and min(achieved) > 0.4


def test_apply_in_eval_false_comes_back_and_keeps_evaluation_dense(tmp_path):
    model, _ = build("bert")
    crisp.set_sparsity(model, 0.8)
    crisp.configure(model, apply_in_eval=False)
    crisp.save_pretrained(model, tmp_path, train_word_tokenizer(["words"], 8))
    back = reload_elsewhere(tmp_path, *batch(True))
    assert back["apply_in_eval"] == [False, False] and back["achieved"] == [0.0, 0.0]


def test_without_crisp_transformers_refuses_the_folder_instead_of_loading_it_dense(tmp_path):
    model, _ = build("bert")
    crisp.set_sparsity(model, 0.8)
    crisp.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attn_implementation"] == "crisp" and config["crisp"]["sparsity"] == [0.8, 0.8]
    code = f"from transformers import AutoModelForSequenceClassification as A; A.from_pretrained({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and 'attn_implementation="crisp"' in proc.stderr


def test_a_lockstep_groups_per_run_sparsity_is_not_saved_as_one_model(tmp_path):
    model, _ = build("bert")
    for module in crisp.sparsity.layers.attention_layers(model):
        module.crisp_sparsity = (0.5, 0.8)
    with pytest.raises(ValueError, match="one sparsity per run"):
        crisp.save_pretrained(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_the_sparsifier_and_its_own_keys_come_back(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, _ = build("bert")
    crisp.prepare(model)
    crisp.configure(model, sparsifier="entmax", alpha=2.0)
    crisp.save_pretrained(model, tmp_path / "saved")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    layers = crisp.sparsity.layers.attention_layers(back)
    assert {m.crisp_sparsifier for m in layers} == {"entmax"}
    assert all(m.crisp_sparsifier_params == {"alpha": 2.0} for m in layers)


# ---------------------------------------------------------------------------------------------- saved by a run

EVALUATE = """
import json, sys, torch
from omegaconf import OmegaConf
import crisp
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from crisp.sparsity.calibration import MODEL_INPUTS
from crisp.sparsity.families import family_of
from crisp.training import tasks
from crisp.training.data import load, tokenize

folder, record = sys.argv[1], json.loads(open(sys.argv[2]).read())
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
data = OmegaConf.create(record["config"]["data"])
task, splits = load(data)
split = splits["validation"]
val = tokenize(tokenizer, split, data.max_length, cache=False, token_types=family_of(model).token_types)
loss, correct, achieved, batches = 0.0, 0, None, 0
with torch.no_grad():
    for start in range(0, len(val), data.eval_batch_size):
        batch = val.__getitems__(list(range(start, min(start + data.eval_batch_size, len(val)))))
        logits = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits
        loss += float(tasks.loss(task, logits, batch["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        stats = torch.tensor([s.achieved_sparsity for s in crisp.attention_stats(model)], dtype=torch.float64)
        achieved, batches = stats if achieved is None else achieved + stats, batches + 1
print(json.dumps({"implementation": model.config._attn_implementation, "sparsity": crisp.get_sparsity(model),
                  "val_loss": loss / len(val), "val_acc": correct / len(val),
                  "achieved": (achieved / batches).tolist(), "class": type(model).__name__}))
"""

FROM_CONFIG = {
    "bert": "{model_type:bert,hidden_size:32,num_hidden_layers:2,num_attention_heads:4,intermediate_size:64}",
    "mpnet": "{model_type:mpnet,hidden_size:32,num_hidden_layers:2,num_attention_heads:4,intermediate_size:64,"
             "max_position_embeddings:130}",
    "deberta-v2": "{model_type:deberta-v2,hidden_size:32,num_hidden_layers:2,num_attention_heads:4,"
                  "intermediate_size:64,relative_attention:true,pos_att_type:[p2c,c2p],position_buckets:16,share_att_key:true,"
                  "position_biased_input:false,norm_rel_ebd:layer_norm}",
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(FROM_CONFIG))
def test_a_run_saved_by_the_command_line_loads_back_in_a_fresh_process_as_it_validated(arch, tmp_path):
    """trainer.save_weights=true: <run>/model loads with transformers after import crisp, sparse as it trained (its
    per-layer sparsity from the adaptive strategy), and on the run's validation split gives its last epoch's loss,
    accuracy and per-layer achieved sparsity."""
    from tests.conftest import run_crisp, smoke_overrides

    out = tmp_path / "run"
    proc = run_crisp(*smoke_overrides(out, "~model.from_config", f"+model.from_config={FROM_CONFIG[arch]}",
                                      "trainer.save_weights=true", "sparsity=0.6", "strategy=adaptive"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                                  "tokenizer_config.json"]
    evaluate = subprocess.run([sys.executable, "-c", EVALUATE, str(out / "model"), str(out / "results.json")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    back = json.loads(evaluate.stdout.strip().splitlines()[-1])
    assert back["implementation"] == "crisp" and back["class"] == record["trained_model"]["class"]
    assert back["sparsity"] == record["layers"]["configured"] and len(set(back["sparsity"])) > 1  # adaptive's
    final = record["final"]
    assert back["val_acc"] == pytest.approx(final["val_acc"], abs=1e-9)
    assert back["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    assert back["achieved"] == pytest.approx(record["layers"]["achieved_val"], abs=1e-6)
    assert min(back["achieved"]) > 0.3
