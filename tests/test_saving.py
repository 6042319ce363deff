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
